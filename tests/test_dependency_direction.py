"""Arrows only point down (DESIGN.md): every package declares exactly the tq packages below it,
and no module under packages/*/src imports a tq package (or mlx_lm) its package does not
declare. The checker is also run on small synthetic trees, to prove it can fail."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ROOT / "packages"

# --import-mode=importlib keeps tests/ off sys.path: load the rules by file (noxfile does too).
_spec = importlib.util.spec_from_file_location(
    "dependency_rules", Path(__file__).with_name("dependency_rules.py")
)
rules = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("dependency_rules", rules)
_spec.loader.exec_module(rules)


# ------------------------------------------------------------------------ the real workspace


def test_every_package_is_known_and_has_modules():
    packages = rules.load_packages(PACKAGES)
    assert set(packages) == set(rules.EXPECTED_TQ)
    for pkg in packages.values():
        assert rules.modules(pkg), f"{pkg.name}: no modules under {pkg.root / 'src'}"
        assert (pkg.root / "src" / pkg.module / "__init__.py").exists()


def test_declared_tq_dependencies_follow_the_layer_order():
    packages = rules.load_packages(PACKAGES)
    for name, expected in rules.EXPECTED_TQ.items():
        got = packages[name].tq_requires
        assert got == expected, f"{name} declares {sorted(got)}, DESIGN.md says {sorted(expected)}"


def test_mlx_lm_is_available_only_where_declared():
    packages = rules.load_packages(PACKAGES)
    for name, expected in rules.EXPECTED_MLX_LM.items():
        got = "mlx-lm" in rules.available(packages, packages[name])
        assert got == expected, f"{name}: mlx_lm importable everywhere is {got}, not {expected}"
    core = packages["tq-core"]
    assert "mlx-lm" in core.extras.get("lm", {}), "tq-core's [lm] extra must declare mlx-lm"
    assert "mlx-lm" in rules.available(packages, core, own_extra="lm")


def test_no_module_imports_what_its_package_does_not_declare():
    violations = rules.check(PACKAGES)
    assert not violations, "\n".join(map(str, violations))


def test_nox_closures_hold_only_declared_packages():
    """What each nox package session installs (a sibling or a package above is never in it)."""
    packages = rules.load_packages(PACKAGES)
    none = frozenset()
    lm = frozenset({"lm"})
    assert rules.closure(packages, "tq-core") == {"tq-core": none}
    assert rules.closure(packages, "tq-core", lm) == {"tq-core": lm}
    assert rules.closure(packages, "tq-kernels") == {"tq-kernels": none, "tq-core": none}
    assert rules.closure(packages, "tq-kvcache") == {
        "tq-kvcache": none,
        "tq-kernels": none,
        "tq-core": none,
    }
    assert rules.closure(packages, "tq-stream") == {
        "tq-stream": none,
        "tq-kernels": none,
        "tq-core": lm,
    }
    assert rules.closure(packages, "tq-cli") == {
        "tq-cli": none,
        "tq-stream": none,
        "tq-kvcache": none,
        "tq-kernels": none,
        "tq-core": lm,
    }


# ------------------------------------------------------------ the checker on synthetic trees


def _fake_package(
    root: Path, name: str, deps: list[str], module: str, source: str, extras: str = ""
) -> Path:
    pkg = root / name
    src = pkg / "src" / name.replace("-", "_")
    (src / module).parent.mkdir(parents=True, exist_ok=True)
    quoted = ", ".join(f'"{d}"' for d in deps)
    (pkg / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "0"\ndependencies = [{quoted}]\n{extras}'
    )
    (src / module).write_text(source)
    return src / module


CORE_EXTRAS = '[project.optional-dependencies]\nlm = ["mlx-lm>=0.30"]\n'


def test_checker_reports_an_upward_import_with_file_and_line(tmp_path):
    bad = _fake_package(
        tmp_path,
        "tq-core",
        ["mlx>=0.30", "numpy"],
        "rotation.py",
        "import mlx.core\nfrom . import pack\n\ndef f():\n    from tq_cli.main import cli\n",
        CORE_EXTRAS,
    )
    violations = rules.check(tmp_path)
    assert [(v.file, v.line, v.package, v.imported) for v in violations] == [
        (bad, 5, "tq-core", "tq_cli")
    ]
    message = str(violations[0])
    assert message.startswith(f"{bad}:5: tq-core imports tq_cli")
    assert "rotation.py:5" in message


def test_checker_reports_siblings_mlx_lm_outside_the_extra_and_dynamic_imports(tmp_path):
    _fake_package(
        tmp_path,
        "tq-stream",
        ["tq-core[lm]", "tq-kernels"],
        "reader.py",
        "import tq_kvcache\nimport mlx_lm\nfrom tq_core import x\nimport tq_stream.y\n",
    )
    _fake_package(
        tmp_path,
        "tq-kernels",
        ["tq-core"],
        "backend.py",
        "import importlib\n\ndef f():\n    return importlib.import_module('tq_stream.reader')\n"
        "def g():\n    from mlx_lm import load\n",
    )
    _fake_package(tmp_path, "tq-core", ["mlx"], "weights.py", "import mlx_lm.utils\n", CORE_EXTRAS)
    _fake_package(
        tmp_path, "tq-core", ["mlx"], "lm/load.py", "from mlx_lm import utils\n", CORE_EXTRAS
    )
    got = sorted((v.package, v.imported, v.file.name, v.line) for v in rules.check(tmp_path))
    assert got == [
        ("tq-core", "mlx_lm", "weights.py", 1),
        ("tq-kernels", "mlx_lm", "backend.py", 6),
        ("tq-kernels", "tq_stream", "backend.py", 4),
        ("tq-stream", "tq_kvcache", "reader.py", 1),
    ]


def test_mlx_lm_in_the_lm_subpackage_needs_the_extra_to_declare_it(tmp_path):
    _fake_package(tmp_path, "tq-core", ["mlx"], "lm/load.py", "from mlx_lm import utils\n")
    got = [(v.package, v.imported) for v in rules.check(tmp_path)]
    assert got == [("tq-core", "mlx_lm")]
