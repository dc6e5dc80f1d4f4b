"""``pip install .`` gives a working mmdemo: pyproject.toml declares what mmdemo imports, with the pins of
requirements.txt (and the test tools of requirements-test.txt as the ``test`` extra)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def canonical(requirement: str) -> str:
    """The distribution's name as pip compares them (``PyYAML==6.0.3`` -> ``pyyaml``)."""
    name = re.split(r"[\[=<>!~; ]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_pyproject_pins_what_the_requirements_files_pin():
    assert project()["dependencies"] == pins(ROOT / "requirements.txt")
    assert project()["optional-dependencies"]["test"] == pins(ROOT / "requirements-test.txt")
    assert project()["scripts"]["mmdemo"] == "mmdemo.cli:main"


def third_party_imports() -> dict[str, str]:
    """Every top-level module mmdemo imports that is neither the standard library nor mmdemo -> a file using it."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "mmdemo").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top and top != "mmdemo" and top not in sys.stdlib_module_names:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_module_mmdemo_imports_is_a_declared_dependency():
    declared = {canonical(requirement) for requirement in project()["dependencies"]}
    distributions = packages_distributions()
    undeclared = {module: (where, distributions.get(module))
                  for module, where in third_party_imports().items()
                  if not {canonical(d) for d in distributions.get(module, [module])} & declared}
    assert not undeclared, f"imported but not in pyproject's dependencies (module: file, distribution): {undeclared}"
