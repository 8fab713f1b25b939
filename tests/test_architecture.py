"""The package's structure as invariants (docs/architecture.md): no import cycle between modules, no
private name imported across modules, imports inside functions only where the docs list them, and
result types that never reach for their views."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "relation_lens"
# third-party packages imported at first use, not at `import relation_lens` (seconds of import time
# for a notebook that only reads results, or a CLI asked for --help); docs/architecture.md lists them
LAZY_THIRD_PARTY = {"transformer_lens", "transformers", "datasets", "huggingface_hub"}
pytestmark = pytest.mark.transformer_lens_4


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _target(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str):
    """``(node, target module, names, inside a function, under TYPE_CHECKING)`` of every import."""
    tree = ast.parse(MODULES[module].read_text())
    found = []

    def walk(node, in_function: bool, type_checking: bool):
        for child in ast.iter_child_nodes(node):
            fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            tc = type_checking or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, ast.ImportFrom):
                found.append((child, _target(module, child), [a.name for a in child.names], in_function, type_checking))
            elif isinstance(child, ast.Import):
                for a in child.names:
                    found.append((child, a.name, [], in_function, type_checking))
            walk(child, fn, tc)

    walk(tree, False, False)
    return found


def _graph() -> dict[str, set[str]]:
    """Module-level imports between relation_lens modules (an import of ``pkg.mod`` depends on ``pkg``
    too: Python runs the package's ``__init__`` first)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for _, target, names, in_fn, tc in _imports(m):
            if in_fn or tc or not target.startswith("relation_lens"):
                continue
            deps = {f"{target}.{n}" if f"{target}.{n}" in MODULES else target for n in names} or {target}
            for dep in deps:
                parts = dep.split(".")
                for i in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:i])
                    if prefix in MODULES and prefix != m and not m.startswith(prefix + "."):
                        graph[m].add(prefix)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_cycle_between_modules():
    assert _cycle(_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    """The check above can fail: a made-up graph with a cycle is caught."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_private_name_imported_across_modules():
    bad = [(m, target, n) for m in MODULES for _, target, names, _, _ in _imports(m)
           if target.startswith("relation_lens") for n in names if n.startswith("_") and not n.startswith("__")]
    assert bad == []


def test_imports_inside_functions_only_where_listed():
    """Inside a function: the CLI's lazy imports, and the heavy third-party packages that
    ``import relation_lens`` does not pay for; nothing of relation_lens's own, nothing of the
    standard library."""
    bad = []
    for m in MODULES:
        if m == "relation_lens.cli":
            continue
        for node, target, _, in_fn, _ in _imports(m):
            if in_fn and target.split(".")[0] not in LAZY_THIRD_PARTY:
                bad.append(f"{m}:{node.lineno} imports {target}")
    assert bad == []


def test_results_never_import_views():
    for m in MODULES:
        if m.startswith("relation_lens.results"):
            targets = {t for _, t, _, _, _ in _imports(m)}
            assert not any(t.startswith("relation_lens.views") for t in targets), m


@pytest.mark.parametrize("kind", ["plot", "html"])
def test_every_result_type_has_its_views(kind):
    """Each result type reaches a renderer registered by relation_lens.views (not by importing it)."""
    import relation_lens as rl
    from relation_lens.results import Result
    from relation_lens.results.codec import _view

    types = [rl.TraceResult, rl.DatasetTraceResult, rl.KnockoutResult, rl.DatasetKnockoutResult, rl.PatchResult]
    for cls in types:
        assert issubclass(cls, Result)
        assert callable(_view(cls.__new__(cls), kind))


def test_transformer_lens_is_imported_only_by_the_model_interface_and_the_loaders():
    """Both lines of TransformerLens are reached through relation_lens.model_interface (and loaded by
    relation_lens.models): no other module imports TransformerLens."""
    allowed = ("relation_lens.model_interface", "relation_lens.models")
    bad = [f"{m}:{node.lineno}" for m in MODULES if not m.startswith(allowed)
           for node, target, _, _, _ in _imports(m) if target.split(".")[0] == "transformer_lens"]
    assert bad == []
