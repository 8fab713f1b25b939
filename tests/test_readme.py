"""The README's quick start runs as written."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.transformer_lens_4  # line-agnostic: CI runs it under TransformerLens 4 too

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"## Quick start\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README quick start", "exec"), {})
    assert (tmp_path / "trace.png").is_file() and (tmp_path / "trace.html").is_file()
    assert "Italy" in capsys.readouterr().out  # the edit took effect inside the block


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmds = [line for line in text.splitlines() if "pytest" in line and line.startswith("python3 -m venv")]
    assert len(test_cmds) == 2  # TransformerLens 3.x (the suite) and 4.x (its second environment)
    for test_cmd in test_cmds:
        assert test_cmd.replace("pip install ", "pip install -q ") in ci
