"""``dqrm dashboard``: the project's wandb workspace, created from the spec in ``dashboards/wandb_workspace.yaml``.

The spec lists sections and line plots over the metrics the CLI logs; ``{table}`` expands to one line per embedding
table of the data's feature schema (``--schema``, a schema YAML or a config holding ``data.schema``; default: Criteo's
26 tables), named by the table's first feature, under which QAT logs the table's scale and error. It is turned into a
workspace with wandb's ``wandb-workspaces`` package (optional: ``pip install wandb-workspaces``), which talks to the
wandb server, so this command needs network access and credentials (``wandb login``).
"""

from __future__ import annotations

import argparse
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

from dqrm_lightning.schema import FeatureSchema, criteo_schema, load_schema

SPEC = Path(__file__).resolve().parents[2] / "dashboards" / "wandb_workspace.yaml"


def load_spec(path: str | Path = SPEC, schema: FeatureSchema | None = None) -> dict[str, Any]:
    """The workspace spec with ``{table}`` expanded to each table of ``schema`` (``None``: Criteo), by its first
    feature (``C1`` .. ``C26`` for Criteo); raises ``ValueError`` naming a malformed entry."""
    schema = schema or criteo_schema()
    tables = [schema.features_of(table)[0] for table in schema.table_names]
    spec = yaml.safe_load(Path(path).read_text())
    for s, section in enumerate(spec.get("sections", [])):
        for p, panel in enumerate(section.get("panels", [])):
            if not panel.get("y"):
                raise ValueError(f"{path}: sections[{s}].panels[{p}] has no `y` metrics")
            panel["y"] = [k.format(table=t) for k in panel["y"] for t in (tables if "{table}" in k else [""])]
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
    parser.add_argument("--schema", default=None, help="the data's feature schema (YAML; default: Criteo's tables)")
    args = parser.parse_args(argv)
    schema = load_schema(args.schema) if args.schema else None
    workspace = build_workspace(args.entity, args.project, load_spec(args.spec, schema))
    workspace.save()
    return str(workspace.url)
