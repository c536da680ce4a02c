"""The one-way dependency rules of the workspace, checked by an AST scan of every module."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import tomllib

#: DESIGN.md's arrows: each package and the tq packages it may depend on.
EXPECTED = {
    "tq-core": set(),
    "tq-kernels": {"tq-core"},
    "tq-kvcache": {"tq-core", "tq-kernels"},
    "tq-stream": {"tq-core", "tq-kernels"},
    "tq-cli": {"tq-core", "tq-kernels", "tq-kvcache", "tq-stream"},
}


@dataclass(frozen=True)
class Violation:
    file: Path
    line: int
    package: str
    imported: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.package} imports {self.imported}, which it may not"


def _requirement_name(req: str) -> tuple[str, set[str]]:
    m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(\[([^\]]*)\])?", req)
    extras = {e.strip() for e in (m.group(3) or "").split(",") if e.strip()}
    return m.group(1).lower().replace("_", "-"), extras


def declared(package_dir: Path) -> tuple[set[str], bool]:
    """(tq packages declared as dependencies, whether mlx_lm is available to it)."""
    project = tomllib.loads((package_dir / "pyproject.toml").read_text())["project"]
    tq, lm = set(), False
    for req in project.get("dependencies", []):
        name, extras = _requirement_name(req)
        if name.startswith("tq-"):
            tq.add(name)
            lm |= name == "tq-core" and "lm" in extras
        lm |= name == "mlx-lm"
    return tq, lm


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def check(packages_root: Path) -> list[Violation]:
    """Every import of a tq package or mlx_lm that the importing package may not make."""
    violations = []
    for package_dir in sorted(
        p for p in packages_root.iterdir() if (p / "pyproject.toml").exists()
    ):
        name = package_dir.name
        own = name.replace("-", "_")
        tq_deps, lm = declared(package_dir)
        allowed = {own} | {d.replace("-", "_") for d in tq_deps}
        for file in sorted((package_dir / "src").rglob("*.py")):
            in_lm_extra = (
                own == "tq_core" and "lm" in file.relative_to(package_dir / "src").parts[1:-1]
            )
            for line, mod in _imports(ast.parse(file.read_text(), str(file))):
                if mod.startswith("tq_") and mod not in allowed:
                    violations.append(Violation(file, line, name, mod))
                elif mod == "mlx_lm" and not (lm or in_lm_extra):
                    violations.append(Violation(file, line, name, mod))
    return violations
