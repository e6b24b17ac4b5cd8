"""The notebooks in notebooks/ run top to bottom (with a tiny budget, set through their NB_*
environment knobs), so they cannot rot.

They run on a tiny random model (the `tiny_dir` HF checkpoint of conftest.py, through the NB_MODEL
knob), not on SmolLM2-135M: what these tests check is that every cell runs and prints what it
should. The real model, with the bundled EAGLE-3 and Medusa drafters the tour uses by default, is
tested in one place, tests/test_smollm2.py. The tour gets the EAGLE-3 drafter that the training
notebook trained for the tiny model (NB_EAGLE3), and untrained Medusa heads (NB_MEDUSA names no
directory, the notebook's fallback for an install without trained heads).

Each notebook runs in a fresh IPython kernel started from this interpreter (a kernelspec written
to a temporary directory, so no `ipykernel install` is needed), with notebooks/ as the working
directory. An error in any cell fails the test with that cell's traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT = 600  # seconds per cell; the tiny budgets below need far less


def _kernel_manager(tmp: Path) -> AsyncKernelManager:
    """A kernel manager whose only kernel runs `sys.executable -m ipykernel_launcher`."""
    spec = tmp / "kernels" / "specjax-notebook-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "specjax notebook test",
                "language": "python",
            }
        )
    )
    ksm = KernelSpecManager(kernel_dirs=[str(tmp / "kernels")], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name="specjax-notebook-test", kernel_spec_manager=ksm)


def data_root(tmp: Path) -> Path:
    """A data folder in the layout of ../shared/data (train/ prompts, eval/spec_bench.jsonl),
    so the notebooks run the same with or without the shared folder next to the checkout."""
    from test_train import write_train_data

    root = write_train_data(tmp / "data")
    (root / "eval").mkdir()
    cats = [
        "extraction",
        "coding",
        "translation",
        "summarization",
        "qa",
        "math_reasoning",
        "rag",
        "roleplay",
    ]  # Spec-Bench's names (the tour picks some)
    (root / "eval" / "spec_bench.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "question_id": i,
                    "category": c,
                    "turns": [f"Question {i} about {c}: explain it in a few sentences."],
                }
            )
            + "\n"
            for i, c in enumerate(cats * 2)
        )
    )
    return root


def run_notebook(name: str, tmp: Path, **knobs) -> nbformat.NotebookNode:
    """Execute notebooks/NAME with the NB_* knobs -> the executed notebook (cells with outputs).
    Raises nbclient's CellExecutionError (with the cell's traceback) when a cell fails."""
    nb = nbformat.read(NB_DIR / name, as_version=4)
    env = dict(os.environ, **{k: str(v) for k, v in knobs.items()})
    env["SPECJAX_DATA"] = str(data_root(tmp))
    # The kernel runs in notebooks/: put this checkout first on its path, so the notebooks import
    # the specjax under test even when another checkout is the one installed (pip install -e).
    env["PYTHONPATH"] = os.pathsep.join(
        [str(NB_DIR.parent)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # figures as outputs
    client = NotebookClient(
        nb,
        km=_kernel_manager(tmp),
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(NB_DIR)}},
    )
    t0 = time.perf_counter()
    client.execute(env=env)
    print(f"{name}: {time.perf_counter() - t0:.0f} s")
    return nb


def text_of(nb) -> str:
    """All stdout / text/plain / markdown output of the executed notebook, concatenated."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                parts.append(out["text"])
            elif "data" in out:
                parts.append(out["data"].get("text/markdown", ""))
                parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def n_images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", []))


def test_notebooks_are_committed_without_outputs():
    for path in sorted(NB_DIR.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        dirty = [
            i
            for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and (c.outputs or c.execution_count is not None)
        ]
        assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir):
    """train_eagle_drafter.ipynb with a tiny budget -> (executed notebook, its run directory)."""
    tmp = tmp_path_factory.mktemp("train_nb")
    out = tmp / "run"
    nb = run_notebook(
        "train_eagle_drafter.ipynb",
        tmp,
        NB_MODEL=tiny_dir,
        NB_PROMPTS=8,
        NB_EVAL_PROMPTS=1,
        NB_STEPS=6,
        NB_NEW_TOKENS=16,
        NB_SEQ_LEN=144,
        NB_DRAFT_VOCAB=64,
        NB_OUT=out,
    )
    return nb, out


def test_train_notebook(trained):
    nb, out = trained
    text = text_of(nb)
    assert "trained 6 steps" in text
    assert "| EAGLE-3 tree |" in text and "| NO |" not in text
    assert n_images(nb) >= 1  # loss and accuracy curves
    history = [json.loads(x) for x in (out / "run" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "loss" in r][-1] == 6
    assert (out / "run" / "drafter" / "config.json").exists()


def test_tour_notebook(tmp_path, tiny_dir, trained):
    knobs = dict(
        NB_MODEL=tiny_dir,
        NB_PROMPTS=1,
        NB_NEW_TOKENS=16,
        NB_EAGLE3=trained[1] / "run" / "drafter",
        NB_MEDUSA=tmp_path / "no-heads",
    )
    nb = run_notebook("speculative_decoding_tour.ipynb", tmp_path, **knobs)
    text = text_of(nb)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    for method in (
        "AR",
        "ngram",
        "ngram tree",
        "layer_skip",
        "layer_skip tree",
        "small_model",
        "EAGLE-3 tree",
        "Medusa",
    ):
        assert any(line.startswith(f"| {method}") for line in table), (method, table)
    assert not any("| NO |" in line for line in table), table
    assert n_images(nb) >= 2  # speedup / tau bars, acceptance histogram
