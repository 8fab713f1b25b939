"""Every Python example in the docs runs as written (the README's quick start has its own test;
docs/walkthrough.md is the rendered output of experiments/walkthrough.py, which runs its code), and
the docstrings' ``>>>`` examples run as doctests."""

import doctest
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["docs/tracing.md", "docs/editing.md", "docs/evaluation.md", "docs/architecture.md"]


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_every_doc_with_python_is_covered():
    with_code = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md") if _blocks(p)}
    assert with_code - set(DOCS) == {"docs/walkthrough.md"}


@pytest.mark.parametrize("doc", DOCS)
def test_doc_examples_run(doc, tmp_path, monkeypatch):
    import relation_lens as rl

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rl.editing.registry, "METHODS", dict(rl.METHODS))  # methods a doc registers stay there
    monkeypatch.setattr(rl, "METHODS", rl.editing.registry.METHODS)
    namespace: dict = {}
    for i, code in enumerate(_blocks(ROOT / doc)):
        code = code.replace("...  ", "pass  ")  # an elided body inside a with-block
        exec(compile(code, f"{doc} example {i + 1}", "exec"), namespace)


@pytest.mark.parametrize("module", ["relation_lens", "relation_lens.editing.requests", "relation_lens.errors",
                                    "relation_lens.intervals", "relation_lens.tracing.config",
                                    "relation_lens.tracing.patch", "relation_lens.tracing.path_patch"])
def test_docstring_examples(module):
    import importlib

    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
