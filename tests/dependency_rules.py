"""The workspace's one-way dependency rules (DESIGN.md), read from the pyproject.toml files.

Two users: ``tests/test_dependency_direction.py`` scans every module under ``packages/*/src``
with :func:`check`, and ``noxfile.py`` installs each package with :func:`closure` (that package
and what it declares, recursively, and nothing more). Standard library only.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: DESIGN.md's arrows: the tq packages each package declares, exactly.
EXPECTED_TQ = {
    "tq-core": set(),
    "tq-kernels": {"tq-core"},
    "tq-kvcache": {"tq-core", "tq-kernels"},
    "tq-stream": {"tq-core", "tq-kernels"},
    "tq-cli": {"tq-core", "tq-kernels", "tq-kvcache", "tq-stream"},
}
#: Which packages may import mlx_lm everywhere (tq-kvcache declares mlx-lm; tq-stream and
#: tq-cli declare tq-core[lm]). tq-core may import it only in tq_core/lm/, its [lm] extra.
EXPECTED_MLX_LM = {
    "tq-core": False,
    "tq-kernels": False,
    "tq-kvcache": True,
    "tq-stream": True,
    "tq-cli": True,
}

_REQUIREMENT = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def normalize(name: str) -> str:
    """PEP 503 name: ``tq_core`` and ``TQ.Core`` are ``tq-core``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirement(requirement: str) -> tuple[str, frozenset[str]]:
    """``"tq-core[lm]>=0.1; python_version>'3'"`` -> ``("tq-core", {"lm"})``."""
    m = _REQUIREMENT.match(requirement)
    if not m:
        raise ValueError(f"cannot read the requirement {requirement!r}")
    extras = frozenset(normalize(e) for e in (m.group(2) or "").split(",") if e.strip())
    return normalize(m.group(1)), extras


def _requirements(items: list[str]) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for requirement in items:
        name, extras = parse_requirement(requirement)
        out[name] = out.get(name, frozenset()) | extras
    return out


class Package(NamedTuple):
    name: str  #: distribution name, ``tq-core``
    root: Path  #: the folder holding its pyproject.toml
    requires: dict[str, frozenset[str]]  #: [project].dependencies: name -> extras
    extras: dict[str, dict[str, frozenset[str]]]  #: [project.optional-dependencies]

    @property
    def module(self) -> str:
        return self.name.replace("-", "_")

    @property
    def tq_requires(self) -> set[str]:
        return {name for name in self.requires if name.startswith("tq-")}


def load_packages(packages_root: Path) -> dict[str, Package]:
    """Every package under ``packages_root`` (a folder with a pyproject.toml), by name."""
    packages = {}
    for pyproject in sorted(packages_root.glob("*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        name = normalize(project["name"])
        extras = {
            normalize(extra): _requirements(reqs)
            for extra, reqs in project.get("optional-dependencies", {}).items()
        }
        requires = _requirements(project.get("dependencies", []))
        packages[name] = Package(name, pyproject.parent, requires, extras)
    return packages


def closure(
    packages: dict[str, Package], name: str, extras: frozenset[str] = frozenset()
) -> dict[str, frozenset[str]]:
    """``{package: extras}`` of ``name[extras]`` and every tq package it declares, recursively
    (through the extras asked for too): exactly what installing it pulls in from the workspace."""
    found: dict[str, frozenset[str]] = {}
    todo = [(name, frozenset(extras))]
    while todo:
        pkg, want = todo.pop()
        if pkg in found and want <= found[pkg]:
            continue
        found[pkg] = found.get(pkg, frozenset()) | want
        declared = dict(packages[pkg].requires)
        for extra in want:
            for dep, dep_extras in packages[pkg].extras.get(extra, {}).items():
                declared[dep] = declared.get(dep, frozenset()) | dep_extras
        todo += [(dep, e) for dep, e in declared.items() if dep in packages]
    return found


def available(packages: dict[str, Package], pkg: Package, own_extra: str | None = None) -> set[str]:
    """Distributions a module of ``pkg`` may import: itself, what it declares, what the extras
    it asks of tq packages declare (``tq-core[lm]`` brings mlx-lm) and, inside its own
    subpackage named after one of its extras, what that extra declares."""
    declared = dict(pkg.requires)
    if own_extra is not None:
        declared.update(pkg.extras.get(own_extra, {}))
    names = {pkg.name, *declared}
    for dep, extras in declared.items():
        if dep in packages:
            for extra in extras:
                names |= set(packages[dep].extras.get(extra, {}))
    return names


#: The imports the rules watch: first-party packages and mlx_lm. Others are not checked.
def watched(module: str) -> bool:
    return module.startswith("tq_") or module == "mlx_lm"


_DYNAMIC = {"import_module", "__import__"}


def imports(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """``(line, top-level module)`` of every absolute import anywhere in the module: top level,
    in functions, under ``if TYPE_CHECKING``, and ``importlib.import_module("x")`` /
    ``__import__("x")`` with a literal name. Relative imports are the package's own."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if called in _DYNAMIC and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                if not arg.value.startswith("."):
                    yield node.lineno, arg.value.split(".")[0]


class Violation(NamedTuple):
    file: Path
    line: int
    package: str
    imported: str
    allowed: tuple[str, ...]

    def __str__(self) -> str:
        return (
            f"{self.file}:{self.line}: {self.package} imports {self.imported}, which it does not "
            f"declare (it may import {', '.join(self.allowed)})"
        )


def modules(pkg: Package) -> list[Path]:
    return sorted((pkg.root / "src").rglob("*.py"))


def check(packages_root: Path) -> list[Violation]:
    """Every watched import that its package may not make, in file and line order."""
    packages = load_packages(packages_root)
    violations = []
    for pkg in packages.values():
        src = pkg.root / "src"
        for file in modules(pkg):
            parts = file.relative_to(src).with_suffix("").parts
            # tq_core/lm/... and tq_core/lm.py are the [lm] extra's code.
            own_extra = parts[1] if len(parts) > 1 and parts[1] in pkg.extras else None
            may = {m.replace("-", "_") for m in available(packages, pkg, own_extra)}
            for line, module in imports(ast.parse(file.read_text(), str(file))):
                if watched(module) and module not in may:
                    allowed = tuple(sorted(m for m in may if watched(m)))
                    violations.append(Violation(file, line, pkg.name, module, allowed))
    return violations
