"""nox sessions: lint, each package alone in a fresh environment, integration, wheels.

Each package session (core, kernels, kvcache, stream, cli) creates a fresh venv holding only
that package and the closure of what its pyproject.toml declares (tq packages and their extras,
recursively; see tests/dependency_rules.py), installed non-editable from the local folders,
plus MLX's CPU backend on Linux and pytest, and checks that no other tq package is there before
running that package's tests: an import of an undeclared tq package fails the session.

    uv run --frozen nox                # every session, as CI does
    uv run --frozen nox -s kvcache     # one session
    uv run --frozen nox -s stream -- -k reader   # extra arguments go to pytest

The environment (LD_PRELOAD, TQ_*, HF_*) reaches every command unchanged.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PACKAGES = ROOT / "packages"

_spec = importlib.util.spec_from_file_location(
    "dependency_rules", ROOT / "tests" / "dependency_rules.py"
)
rules = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("dependency_rules", rules)
_spec.loader.exec_module(rules)

nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = False
nox.options.reuse_venv = "no"  # a fresh venv every run; uv's cache keeps it quick
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

#: Sessions run on the interpreter nox runs on (python=None).
PYTHON = None
#: Linux has no default MLX backend: tests run on the CPU one.
BACKEND = ["mlx[cpu]"] if sys.platform.startswith("linux") else []

#: Run in a session's venv with the expected tq distributions as arguments: exactly those are
#: installed, each from a local file or folder (never an index), none editable.
VERIFY_INSTALLED = """
import importlib, importlib.metadata as md, json, sys
want, got = set(sys.argv[1:]), {}
for dist in md.distributions():
    name = dist.metadata["Name"].lower().replace("_", "-")
    if name.startswith("tq-"):
        got[name] = json.loads(dist.read_text("direct_url.json") or "{}")
assert set(got) == want, f"installed tq packages {sorted(got)}, expected exactly {sorted(want)}"
for name, direct in sorted(got.items()):
    url = direct.get("url", "")
    assert url.startswith("file://"), f"{name} came from {url or 'an index'}, not a local path"
    assert not direct.get("dir_info", {}).get("editable"), f"{name} is installed editable"
    module = importlib.import_module(name.replace("-", "_"))
    print(name, module.__version__, url)
"""


def _verify_script(folder: str) -> str:
    path = Path(folder) / "verify_installed.py"
    path.write_text(VERIFY_INSTALLED)
    return str(path)


def _locked(name: str) -> str:
    """``name==version`` as uv.lock has it, so a session runs the tool the dev env runs."""
    lock = rules.tomllib.loads((ROOT / "uv.lock").read_text())
    versions = [p["version"] for p in lock.get("package", []) if p["name"] == name]
    return f"{name}=={versions[0]}" if versions else name


def _extras(extras: frozenset[str]) -> str:
    return f"[{','.join(sorted(extras))}]" if extras else ""


def _install_local(session: nox.Session, wanted: dict[str, frozenset[str]]) -> None:
    """Install exactly ``wanted`` ({package: extras}) from the workspace folders, non-editable,
    with MLX's backend and pytest; then prove nothing else of ours came in."""
    local = [f"{p}{_extras(e)} @ {(PACKAGES / p).as_uri()}" for p, e in sorted(wanted.items())]
    # --no-sources: without it uv follows [tool.uv.sources] workspace = true and installs the
    # dependencies editable; with it each one is the folder named here, built as a wheel.
    session.install("--no-sources", *local, *BACKEND, _locked("pytest"))
    session.run("python", _verify_script(session.virtualenv.location), *sorted(wanted))


def _pytest(session: nox.Session, *args: str, **kwargs) -> None:
    session.run(
        "python", "-m", "pytest", *args, "-q", "-ra", "-p", "no:cacheprovider",
        "--import-mode=importlib", *session.posargs, **kwargs,
    )  # fmt: skip


def _package_session(session: nox.Session, name: str, extras: frozenset[str] = frozenset()):
    packages = rules.load_packages(PACKAGES)
    _install_local(session, rules.closure(packages, name, extras))
    with session.chdir(PACKAGES / name):
        # -c and --rootdir: the package's own pyproject.toml (no pytest section) is the config,
        # so the workspace's testpaths/addopts stay out. Exit 5 (no tests yet) passes.
        _pytest(session, "tests", "-c", "pyproject.toml", "--rootdir", ".", success_codes=[0, 5])


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install(_locked("ruff"))
    session.run("ruff", "check", ".")


@nox.session(python=PYTHON)
def core(session: nox.Session) -> None:
    # tq-core's tests cover its [lm] extra too (tests/lm needs mlx-lm).
    _package_session(session, "tq-core", frozenset({"lm"}))


@nox.session(python=PYTHON)
def kernels(session: nox.Session) -> None:
    _package_session(session, "tq-kernels")


@nox.session(python=PYTHON)
def kvcache(session: nox.Session) -> None:
    _package_session(session, "tq-kvcache")


@nox.session(python=PYTHON)
def stream(session: nox.Session) -> None:
    _package_session(session, "tq-stream")


@nox.session(python=PYTHON)
def cli(session: nox.Session) -> None:
    _package_session(session, "tq-cli")


@nox.session(python=PYTHON)
def integration(session: nox.Session) -> None:
    """All five packages (tq-core with [lm]) installed together; the workspace's tests/."""
    packages = rules.load_packages(PACKAGES)
    everything: dict[str, frozenset[str]] = {}
    for name in packages:
        for pkg, extras in rules.closure(packages, name).items():
            everything[pkg] = everything.get(pkg, frozenset()) | extras
    everything["tq-core"] |= {"lm"}
    _install_local(session, everything)
    # The `tq serve` tests drive the server with the real OpenAI client.
    session.install(_locked("openai"))
    _pytest(session, "tests")


@nox.session(python=PYTHON, venv_backend="none")
def wheels(session: nox.Session) -> None:
    """Build every wheel and sdist; install each wheel with its tq closure, by file, into a
    clean venv, and import it."""
    packages = rules.load_packages(PACKAGES)
    with tempfile.TemporaryDirectory(prefix="tq-wheels-") as tmp:
        dist = Path(tmp) / "dist"
        session.run("uv", "build", "--all-packages", "-q", "-o", str(dist), external=True)
        wheels = {rules.normalize(w.name.split("-")[0]): w for w in dist.glob("*.whl")}
        sdists = {rules.normalize(s.name.split("-")[0]) for s in dist.glob("*.tar.gz")}
        if sorted(wheels) != sorted(packages) or sdists != set(packages):
            session.error(
                f"expected a wheel and an sdist of each of {sorted(packages)}; "
                f"got wheels {sorted(w.name for w in wheels.values())}, sdists {sorted(sdists)}"
            )
        session.log(f"built {len(wheels)} wheels and {len(sdists)} sdists")
        for name in sorted(packages):
            venv = Path(tmp) / f"venv-{name}"
            python = str(venv / "bin" / "python")
            wanted = rules.closure(packages, name)
            files = [f"{p}{_extras(e)} @ {wheels[p].as_uri()}" for p, e in sorted(wanted.items())]
            session.run("uv", "venv", "-q", "--python", sys.executable, str(venv), external=True)
            session.run(
                "uv", "pip", "install", "-q", "--python", python, *files, *BACKEND, external=True
            )
            session.run(python, _verify_script(tmp), *sorted(wanted), external=True)
