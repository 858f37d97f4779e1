"""The house's shape: no import circle inside the package, and no import from a lower layer to a higher
one (the commands sit on top; the library never imports them). Imports are read with `ast`, those
inside functions included: a lazy import still ties two modules together."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sinkdlm"
SHIPPED = {"sinkdlm.hf_code"}  # copied into exported folders, run without sinkdlm: imports nothing of it


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports (at any depth of the file, TYPE_CHECKING blocks aside)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
            # `from sinkdlm.analysis import stats` takes a module; `from sinkdlm.eval.run import X`, a name of one
            names = submodules if len(submodules) == len(node.names) else [node.module, *submodules]
        else:
            continue
        found |= {n for n in names if n in known}
    return found - {module_name(path)}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(path, known) for name, path in found.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_circles_finds_a_circle_and_nothing_else():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_inside_the_package():
    assert circles(graph()) == []


def test_the_library_never_imports_the_commands():
    upward = {(a, b) for a, targets in graph().items() for b in targets
              if b.startswith("sinkdlm.commands") and not a.startswith("sinkdlm.commands") and a != "sinkdlm.cli"}
    assert upward == set()


def test_the_shipped_model_code_imports_nothing_of_sinkdlm():
    edges = graph()
    assert not {b for a in edges if a.startswith(tuple(SHIPPED)) for b in edges[a]}
