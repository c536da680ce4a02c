"""nox sessions: lint, each package alone in a fresh environment, integration, wheels.

Each package session installs only that package and the closure of what its pyproject.toml
declares (non-editable, from local paths, never from a registry under our names), plus
MLX's CPU backend on Linux and pytest, then runs that package's tests: this is what proves
that `pip install tq-kvcache` alone works.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import nox
import tomllib

ROOT = Path(__file__).resolve().parent
PACKAGES = ROOT / "packages"
nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = False
nox.options.sessions = [
    "lint",
    "core",
    "kernels",
    "kvcache",
    "stream",
    "cli",
    "integration",
    "wheels",
]
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
BACKEND = ["mlx[cpu]"] if sys.platform.startswith("linux") else []


def _deps(name: str) -> list[tuple[str, set[str]]]:
    project = tomllib.loads((PACKAGES / name / "pyproject.toml").read_text())["project"]
    out = []
    for req in project.get("dependencies", []):
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(\[([^\]]*)\])?", req)
        if m.group(1).startswith("tq-"):
            out.append(
                (m.group(1), {e.strip() for e in (m.group(3) or "").split(",") if e.strip()})
            )
    return out


def closure(name: str, extras: frozenset[str] = frozenset()) -> dict[str, set[str]]:
    """{package: extras} for ``name`` and every tq package it declares, recursively."""
    found: dict[str, set[str]] = {name: set(extras)}
    todo = [name]
    while todo:
        for dep, dep_extras in _deps(todo.pop()):
            if dep not in found or not dep_extras <= found[dep]:
                found.setdefault(dep, set()).update(dep_extras)
                todo.append(dep)
    return found


def _requirements(packages: dict[str, set[str]]) -> list[str]:
    reqs = []
    for pkg, extras in sorted(packages.items()):
        suffix = f"[{','.join(sorted(extras))}]" if extras else ""
        reqs.append(f"{pkg}{suffix} @ {(PACKAGES / pkg).as_uri()}")
    return reqs


@nox.session(python=PYTHON)
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", ".")


def _package_session(session, name: str, extras: frozenset[str] = frozenset()):
    session.install(*_requirements(closure(name, extras)), *BACKEND, "pytest")
    session.chdir(PACKAGES / name)
    session.run(
        "python",
        "-m",
        "pytest",
        "tests",
        "-q",
        "-p",
        "no:cacheprovider",
        "--import-mode=importlib",
        "--rootdir",
        ".",
        success_codes=[0, 5],
    )


@nox.session(python=PYTHON)
def core(session):
    # tq-core's own tests include its [lm] extra (tests/lm needs mlx-lm).
    _package_session(session, "tq-core", frozenset({"lm"}))


@nox.session(python=PYTHON)
def kernels(session):
    _package_session(session, "tq-kernels")


@nox.session(python=PYTHON)
def kvcache(session):
    _package_session(session, "tq-kvcache")


@nox.session(python=PYTHON)
def stream(session):
    _package_session(session, "tq-stream")


@nox.session(python=PYTHON)
def cli(session):
    _package_session(session, "tq-cli")


@nox.session(python=PYTHON)
def integration(session):
    session.install(*_requirements(closure("tq-cli")), *BACKEND, "pytest")
    session.run(
        "python", "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "--import-mode=importlib"
    )


@nox.session(python=PYTHON, venv_backend="none")
def wheels(session):
    """Build all five wheels and sdists; install each wheel (by file, with its tq closure)
    into a clean venv and import it."""
    with tempfile.TemporaryDirectory() as tmp:
        dist = Path(tmp) / "dist"
        session.run("uv", "build", "--all-packages", "-o", str(dist), external=True)
        wheels = {w.name.split("-")[0].replace("_", "-"): w for w in dist.glob("*.whl")}
        sdists = list(dist.glob("*.tar.gz"))
        names = sorted(p.name for p in PACKAGES.iterdir() if (p / "pyproject.toml").exists())
        if sorted(wheels) != names or len(sdists) != len(names):
            session.error(f"expected 5 wheels and 5 sdists, got {sorted(wheels)}, {sdists}")
        for name in names:
            venv = Path(tmp) / f"venv-{name}"
            session.run("uv", "venv", "-q", "--python", sys.executable, str(venv), external=True)
            files = [
                str(wheels[p]) + (f"[{','.join(sorted(e))}]" if e else "")
                for p, e in sorted(closure(name).items())
            ]
            session.run(
                "uv",
                "pip",
                "install",
                "-q",
                "--python",
                str(venv / "bin" / "python"),
                *files,
                *BACKEND,
                external=True,
            )
            module = name.replace("-", "_")
            session.run(
                str(venv / "bin" / "python"),
                "-c",
                f"import {module}; print('{name}', {module}.__version__)",
                external=True,
            )
