"""``preprocessing.synthetic`` is imported through its ``__init__`` only, and exports every generator."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import preprocessing.synthetic as synthetic

REPO = Path(__file__).resolve().parents[3]
_CONSUMERS = ("tests", "benchmarks", "workflows", "pipeline", "networks")


def _submodule_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found += [
            f"{path.relative_to(REPO)}:{node.lineno} {n}"
            for n in names
            if n.startswith("preprocessing.synthetic.")
        ]
    return found


def test_nothing_outside_the_package_imports_its_modules():
    offenders = [
        hit
        for folder in _CONSUMERS
        if (REPO / folder).is_dir()
        for path in sorted((REPO / folder).rglob("*.py"))
        for hit in _submodule_imports(path)
    ]
    assert offenders == [], "import these from preprocessing.synthetic instead:\n" + "\n".join(offenders)


def test_every_writer_of_every_module_is_exported():
    missing = []
    for info in pkgutil.iter_modules(synthetic.__path__):
        module = importlib.import_module(f"preprocessing.synthetic.{info.name}")
        for name, obj in vars(module).items():
            if name.startswith("write_") and inspect.isfunction(obj) and obj.__module__ == module.__name__:
                if getattr(synthetic, name, None) is not obj or name not in synthetic.__all__:
                    missing.append(f"{info.name}.{name}")
    assert missing == []
