"""Import direction: `launch → serve → distill → student → teacher → kernels`, no cycles, and inside distill/
library modules never import the runner or the stages, and stages do not import each other.

Every `.py` of the six packages is parsed with `ast`; every import counts, module-level or inside a
function (lazy), `import a.b`, `from a import b`, relative imports and `importlib.import_module("a.b")`
with a literal name. An edge goes to the deepest module the statement names (`from a.b import c` is
`a.b.c` when that is a module, else `a.b`).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ORDER = ("launch", "serve", "distill", "student", "teacher", "kernels")      # imports flow left to right
STAGE_INFRA = {"distill.stages", "distill.stages.base"}              # the registry and the base class


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    file: str
    line: int
    lazy: bool

    def __str__(self) -> str:
        return f"{self.src} -> {self.dst}  ({self.file}:{self.line}{', lazy' if self.lazy else ''})"


def modules(root: Path, packages=ORDER) -> dict[str, Path]:
    """Dotted module name → file, for every .py under the packages."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _deepest(name: str, known) -> str | None:
    """The longest prefix of a dotted name that is one of our modules."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


def _is_lazy(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return True
    return False


def imports(module: str, path: Path, known, root: Path) -> list[Edge]:
    """Every edge from `module` to another of our modules."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    file = str(path.relative_to(root))
    edges, seen = [], set()

    def add(node: ast.AST, name: str | None) -> None:
        dst = _deepest(name, known) if name else None
        if dst and dst != module and (dst, node.lineno) not in seen:
            seen.add((dst, node.lineno))
            edges.append(Edge(module, dst, file, node.lineno, _is_lazy(node, parents)))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                full = f"{origin}.{alias.name}"
                add(node, full if full in known else origin)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id == "import_module"))):
            add(node, node.args[0].value)
    return edges


def graph(root: Path = REPO, packages=ORDER) -> list[Edge]:
    known = modules(root, packages)
    return [edge for module, path in known.items() for edge in imports(module, path, known, root)]


def upward(edges: list[Edge], order=ORDER) -> list[Edge]:
    rank = {package: i for i, package in enumerate(order)}
    return [e for e in edges if rank[e.src.split(".")[0]] > rank[e.dst.split(".")[0]]]


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """The edges inside each strongly connected component of more than one module (Tarjan)."""
    succ: dict[str, set[str]] = {}
    for e in edges:
        succ.setdefault(e.src, set()).add(e.dst)
        succ.setdefault(e.dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:               # iterative, so a deep graph cannot hit the recursion limit
        work = [(v, iter(sorted(succ[v])))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(succ[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.add(w)
                    if w == node:
                        break
                if len(component) > 1:
                    components.append(component)

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return [sorted((e for e in edges if e.src in c and e.dst in c), key=_key) for c in components]


def distill_violations(edges: list[Edge]) -> list[Edge]:
    """Library modules importing distill.runner / distill.stages*, and stage modules importing stages."""
    def is_stages(name: str) -> bool:
        return name == "distill.stages" or name.startswith("distill.stages.")

    def is_stage_module(name: str) -> bool:
        return is_stages(name) and name not in STAGE_INFRA

    bad = []
    for e in edges:
        if not e.src.startswith("distill.") or not e.dst.startswith("distill."):
            continue
        library = e.src != "distill.runner" and not is_stages(e.src)
        if library and (e.dst == "distill.runner" or is_stages(e.dst)):
            bad.append(e)
        elif is_stage_module(e.src) and is_stage_module(e.dst):
            bad.append(e)
    return bad


def _key(edge: Edge) -> tuple:
    return edge.src, edge.dst, edge.line


def _report(title: str, edges) -> str:
    return title + "\n" + "\n".join(f"  {e}" for e in edges)


# ------------------------------------------------------------------------------------ the repo


def test_no_upward_imports():
    bad = upward(graph())
    if bad:
        pytest.fail(_report(f"{len(bad)} import(s) against {' → '.join(ORDER)}:", sorted(bad, key=_key)),
                    pytrace=False)


def test_no_import_cycles():
    found = cycles(graph())
    if found:
        pytest.fail("\n".join(_report(f"import cycle among {sorted({e.src for e in c})}:", c)
                               for c in found), pytrace=False)


def test_distill_library_and_stage_imports():
    bad = distill_violations(graph())
    if bad:
        pytest.fail(_report("distill/: library modules import the runner/stages, or stages import "
                            "each other:", sorted(bad, key=_key)), pytrace=False)


# ---------------------------------------------------------------------- the checker itself


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_sees_lazy_relative_and_from_imports(tmp_path):
    root = _tree(tmp_path, {
        "launch/__init__.py": "",
        "distill/__init__.py": "",
        "distill/runner.py": "from distill.stages import base\n",
        "distill/trainer.py": "def f():\n    from .runner import go\n",           # lazy + relative
        "distill/stages/__init__.py": "",
        "distill/stages/base.py": "",
        "distill/stages/a.py": "from . import base\nfrom distill.stages import b\n",
        "distill/stages/b.py": "import importlib\nimportlib.import_module('launch')\n",
        "student/__init__.py": "",
        "student/model.py": "def load():\n    import student.export\n",
        "student/export.py": "from student import model\n",
        "teacher/__init__.py": "",
        "kernels/__init__.py": "def f():\n    from teacher import x\n",
    })
    edges = graph(root)
    assert {(e.src, e.dst, e.lazy) for e in edges} == {
        ("distill.runner", "distill.stages.base", False),
        ("distill.trainer", "distill.runner", True),
        ("distill.stages.a", "distill.stages.base", False),
        ("distill.stages.a", "distill.stages.b", False),
        ("distill.stages.b", "launch", False),
        ("student.model", "student.export", True),
        ("student.export", "student.model", False),
        ("kernels", "teacher", True),
    }
    assert {(e.src, e.dst) for e in upward(edges)} == {("distill.stages.b", "launch"), ("kernels", "teacher")}
    assert [{(e.src, e.dst) for e in c} for c in cycles(edges)] == [
        {("student.export", "student.model"), ("student.model", "student.export")}]
    assert {(e.src, e.dst) for e in distill_violations(edges)} == {
        ("distill.trainer", "distill.runner"), ("distill.stages.a", "distill.stages.b")}
