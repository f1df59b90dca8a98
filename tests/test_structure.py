"""Static structure checks over our packages: import graph, layer rules (STYLE.md), sizes.

Every ``.py`` file of :data:`PACKAGES` is parsed with :mod:`ast`; nothing is imported, so the checks
see what a runtime check cannot: imports inside functions (lazy) and under ``TYPE_CHECKING``
count like top-level ones. ``from pkg import name`` counts as importing ``pkg.name`` when that is
one of our modules, else as importing ``pkg`` itself.

Hand-written rather than taken from import-linter/pydeps: those need the packages installed as
distributions and a config language of their own; the rules here are five lines of STYLE.md, and
the size limits are not import rules at all.
"""

from __future__ import annotations

import ast
import fnmatch
import io
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "networks", "preprocessing", "workflows")
MODULE_LINES_LIMIT = 400  # every module must stay under this many lines
FUNCTION_LINES_LIMIT = 60  # every function must stay under this many lines of code


@dataclass(frozen=True)
class Module:
    """One parsed module: dotted ``name``, ``path`` relative to the root, source ``text``, ``tree``."""

    name: str
    path: str
    text: str
    tree: ast.Module


@dataclass(frozen=True)
class LayerRule:
    """Modules matching ``where`` (fnmatch on the relative path) must not import ``forbidden``.

    ``forbidden`` holds top-level names (``mlflow``, ``workflows``); ``allowed_in`` lists path
    patterns exempt from the rule (``pipeline/tracking*.py`` may import mlflow).
    """

    text: str
    where: str
    forbidden: tuple[str, ...]
    allowed_in: tuple[str, ...] = ()


LAYER_RULES = (
    LayerRule(
        "networks/ imports nothing else of ours", "networks/*", ("pipeline", "preprocessing", "workflows")
    ),
    LayerRule(
        "preprocessing/ imports only preprocessing/", "preprocessing/*", ("pipeline", "networks", "workflows")
    ),
    LayerRule("pipeline/ never imports workflows/", "pipeline/*", ("workflows",)),
    LayerRule(
        "mlflow only in pipeline/tracking*.py and pipeline/bundle.py",
        "*",
        ("mlflow",),
        ("pipeline/tracking*.py", "pipeline/bundle.py"),
    ),
    LayerRule("dask / distributed only in workflows/", "*", ("dask", "distributed"), ("workflows/*",)),
)


def read_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Module]:
    """Every ``.py`` under ``root/<package>`` -> {dotted module name: Module}; ``__init__`` is the package."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            text = path.read_text(encoding="utf-8")
            name = ".".join(parts)
            modules[name] = Module(name, rel.as_posix(), text, ast.parse(text, str(rel)))
    return modules


def imported_names(module: Module, known: set[str]) -> set[str]:
    """Dotted names ``module`` imports anywhere in its body (functions, ``TYPE_CHECKING`` included).

    A name in ``known`` (our modules) is resolved to the module itself: ``from pkg import sub``
    gives ``pkg.sub`` when that is a module, else ``pkg``. Relative imports are made absolute.
    """
    is_package = module.path.endswith("__init__.py")
    names: set[str] = set()
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                names.add(candidate if candidate in known else base)
    return names


def import_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
    """{module: the modules of ours it imports}; an import of ``a.b.c`` that is no module counts as its
    closest enclosing module (``from a.b import some_function`` -> ``a.b``)."""
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, module in modules.items():
        edges = set()
        for imported in imported_names(module, known):
            while imported and imported not in known:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                edges.add(imported)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), as a module path
    ``[a, b, ..., a]``; sorted, so the report is stable."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # recursion depth is bounded by the number of modules (~100)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(_cycle_in(component, graph) for component in components)


def _cycle_in(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first search inside it)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle in strongly connected component {sorted(component)}")


def layer_violations(modules: dict[str, Module], rules: tuple[LayerRule, ...] = LAYER_RULES) -> list[str]:
    """``"path: imports X (rule text)"`` for every import that breaks a rule."""
    known = set(modules)
    problems = []
    for module in modules.values():
        tops = {name.split(".")[0] for name in imported_names(module, known)}
        for rule in rules:
            if not fnmatch.fnmatch(module.path, rule.where):
                continue
            if any(fnmatch.fnmatch(module.path, pattern) for pattern in rule.allowed_in):
                continue
            for bad in sorted(tops & set(rule.forbidden)):
                problems.append(f"{module.path}: imports {bad} ({rule.text})")
    return sorted(problems)


def long_modules(modules: dict[str, Module], limit: int = MODULE_LINES_LIMIT) -> list[str]:
    """``"path: N lines"`` for every module of ``limit`` lines or more."""
    sizes = {m.path: len(m.text.splitlines()) for m in modules.values()}
    return [f"{path}: {n} lines" for path, n in sorted(sizes.items()) if n >= limit]


_NOT_CODE = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)


def code_lines(function: ast.FunctionDef | ast.AsyncFunctionDef, text: str) -> int:
    """Lines of code of a function: its ``def`` line to its last line, without the docstring, blank
    lines and comment-only lines (nested functions count towards the enclosing one too)."""
    lines = set(range(function.lineno, (function.end_lineno or function.lineno) + 1))
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        if isinstance(body[0].value.value, str):
            lines -= set(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
    source = text.splitlines()
    with_code = set()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type not in _NOT_CODE:
            with_code.update(range(token.start[0], token.end[0] + 1))
    return sum(1 for n in lines if n in with_code and n <= len(source))


def long_functions(modules: dict[str, Module], limit: int = FUNCTION_LINES_LIMIT) -> list[str]:
    """``"path:line name: N lines of code"`` for every function of ``limit`` lines of code or more."""
    found = []
    for module in modules.values():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = code_lines(node, module.text)
                if n >= limit:
                    found.append((module.path, node.lineno, f"{node.name}: {n} lines of code"))
    return [f"{path}:{line} {text}" for path, line, text in sorted(found)]


def _report(title: str, offenders: list[str]) -> str:
    return f"{title} ({len(offenders)}):\n  " + "\n  ".join(offenders)


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return read_modules(REPO)


def test_the_import_graph_of_our_packages_has_no_cycle(modules):
    cycles = [" -> ".join(cycle) for cycle in find_cycles(import_graph(modules))]
    assert not cycles, _report(
        "import cycles (lazy and TYPE_CHECKING imports count; a cycle means a type is in the wrong module)",
        cycles,
    )


def test_layer_rules_of_style_md_hold(modules):
    problems = layer_violations(modules)
    assert not problems, _report("imports that break STYLE.md's layer rules", problems)


def test_every_module_is_under_the_line_limit(modules):
    offenders = long_modules(modules)
    assert not offenders, _report(f"modules of {MODULE_LINES_LIMIT} lines or more (split them)", offenders)


def test_every_function_is_under_the_code_line_limit(modules):
    offenders = long_functions(modules)
    assert not offenders, _report(
        f"functions of {FUNCTION_LINES_LIMIT} lines of code or more (docstring, blanks, comments not counted)",
        offenders,
    )


# -- the checker itself, on a synthetic package --------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> dict[str, Module]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return read_modules(root, ("pkg", "other"))


def test_checker_finds_a_cycle_through_a_lazy_import(tmp_path):
    modules = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import thing\n",
            "pkg/b.py": "def thing():\n    from pkg import c\n    return c\n",
            "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import X\n",
            "pkg/d.py": "import pkg.a\n",  # imports into the cycle, is not part of it
        },
    )
    graph = import_graph(modules)
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert find_cycles({k: v for k, v in graph.items() if k != "pkg.c"} | {"pkg.c": set()}) == []


def test_checker_finds_layer_violations_lazy_ones_included(tmp_path):
    modules = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/tracking_x.py": "import mlflow\n",
            "pkg/user.py": "def f():\n    import mlflow.pyfunc\n    from other import y\n",
            "other/__init__.py": "",
            "other/y.py": "from distributed import Client\n",
        },
    )
    rules = (
        LayerRule("pkg never imports other", "pkg/*", ("other",)),
        LayerRule("mlflow only in tracking", "*", ("mlflow",), ("pkg/tracking*.py",)),
        LayerRule("dask only in pkg", "*", ("distributed",), ("pkg/*",)),
    )
    assert layer_violations(modules, rules) == [
        "other/y.py: imports distributed (dask only in pkg)",
        "pkg/user.py: imports mlflow (mlflow only in tracking)",
        "pkg/user.py: imports other (pkg never imports other)",
    ]


def test_checker_counts_code_lines_without_docstring_blanks_and_comments(tmp_path):
    def body(indent: int, n: int) -> str:
        return "".join(f"{' ' * indent}x{i} = {i}\n" for i in range(n))

    modules = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/ok.py": 'def short():\n    """Doc.\n\n    More doc.\n    """\n    # why\n\n' + body(4, 58),
            "pkg/long.py": "class K:\n    def long(self):\n"
            + body(8, 59)
            + "        return 1\n"
            + "x = 1\n" * 400,
        },
    )
    assert code_lines(modules["pkg.ok"].tree.body[0], modules["pkg.ok"].text) == 59  # def + 58
    assert long_functions(modules) == ["pkg/long.py:2 long: 61 lines of code"]
    assert long_modules(modules) == ["pkg/long.py: 462 lines"]
