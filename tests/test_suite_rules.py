"""Rules the suite keeps about itself: no wall-clock limit on a test's work (a test's time depends on the
host's load, its result does not: issue 37's item 8 was a 25-minute subprocess limit that a quick run
passed at load 15-18 on 2 cores). CI's own limit bounds a hang."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CLOCKS = {"time", "monotonic", "perf_counter", "process_time"}


def _limits(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "timeout" and not (isinstance(kw.value, ast.Constant) and kw.value.value is None) \
                        and not (isinstance(kw.value, ast.Name) and kw.value.id == "SUBPROCESS_TIMEOUT_S"):
                    found.append(f"line {node.lineno}: timeout={ast.unparse(kw.value)}")
        if isinstance(node, ast.Compare):  # `clock() - start < limit`
            calls = [n for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                     and n.func.attr in CLOCKS]
            if calls:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_test_puts_a_wall_clock_limit_on_its_work():
    import conftest

    assert conftest.SUBPROCESS_TIMEOUT_S is None
    bad = {p.name: _limits(ast.parse(p.read_text())) for p in sorted(TESTS.glob("*.py")) if p.name != Path(__file__).name}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_the_rule_finds_a_limit():
    assert _limits(ast.parse("subprocess.run(cmd, timeout=600)")) == ["line 1: timeout=600"]
    assert _limits(ast.parse("assert time.monotonic() - start < 5")) == ["line 1: time.monotonic() - start < 5"]
    assert _limits(ast.parse("subprocess.run(cmd, timeout=None)")) == []
