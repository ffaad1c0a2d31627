"""``dqrm dashboard``: the project's wandb workspace, created from the spec in ``dashboards/wandb_workspace.yaml``.

The spec lists sections and line plots over the metrics the CLI logs; ``{table}`` expands to the 26 features. It is
turned into a workspace with wandb's ``wandb-workspaces`` package (optional: ``pip install wandb-workspaces``), which
talks to the wandb server, so this command needs network access and credentials (``wandb login``).
"""

from __future__ import annotations

import argparse
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

from dqrm_lightning.data.criteo import DEFAULT_CAT_NAMES

SPEC = Path(__file__).resolve().parents[2] / "dashboards" / "wandb_workspace.yaml"


def load_spec(path: str | Path = SPEC) -> dict[str, Any]:
    """The workspace spec with ``{table}`` expanded; raises ``ValueError`` naming a malformed entry."""
    spec = yaml.safe_load(Path(path).read_text())
    for s, section in enumerate(spec.get("sections", [])):
        for p, panel in enumerate(section.get("panels", [])):
            if not panel.get("y"):
                raise ValueError(f"{path}: sections[{s}].panels[{p}] has no `y` metrics")
            panel["y"] = [
                k.format(table=t) for k in panel["y"] for t in (DEFAULT_CAT_NAMES if "{table}" in k else [""])
            ]
    return spec


def metric_keys(spec: dict[str, Any], include: Collection[str] = frozenset()) -> set[str]:
    """Every metric the spec plots, leaving out panels whose ``when`` is not in ``include``."""
    return {
        key
        for section in spec["sections"]
        for panel in section["panels"]
        if panel.get("when") is None or panel["when"] in include
        for key in panel["y"]
    }


def build_workspace(entity: str, project: str, spec: dict[str, Any]) -> Any:
    """A ``wandb_workspaces`` Workspace for the spec (not saved)."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError:
        raise SystemExit("dqrm dashboard needs `pip install wandb-workspaces`") from None
    sections = [
        ws.Section(
            name=section["name"],
            is_open=True,
            panels=[wr.LinePlot(title=p["title"], y=p["y"], log_y=p.get("log_y")) for p in section["panels"]],
        )
        for section in spec["sections"]
    ]
    return ws.Workspace(entity=entity, project=project, name=spec.get("name", "DQRM"), sections=sections)


def main(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="dqrm dashboard", description="Create the DQRM wandb workspace")
    parser.add_argument("--entity", required=True, help="wandb entity (user or team)")
    parser.add_argument("--project", default="dqrm-lightning", help="wandb project")
    parser.add_argument("--spec", default=str(SPEC), help="workspace spec (YAML)")
    args = parser.parse_args(argv)
    workspace = build_workspace(args.entity, args.project, load_spec(args.spec))
    workspace.save()
    return str(workspace.url)
