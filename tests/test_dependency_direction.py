"""Arrows only point down: no module imports a package above its own (DESIGN.md)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "dependency_rules", Path(__file__).with_name("dependency_rules.py")
)
rules = importlib.util.module_from_spec(_spec)
sys.modules["dependency_rules"] = rules  # dataclasses look their module up there
_spec.loader.exec_module(rules)


def test_declared_dependencies_follow_the_design():
    for name, expected in rules.EXPECTED.items():
        tq, _ = rules.declared(ROOT / "packages" / name)
        assert tq == expected, f"{name} declares {sorted(tq)}, DESIGN.md says {sorted(expected)}"


def test_no_module_imports_upward():
    violations = rules.check(ROOT / "packages")
    assert not violations, "\n".join(map(str, violations))


def _fake_package(root: Path, name: str, deps: list[str], module: str, source: str) -> Path:
    pkg = root / name
    src = pkg / "src" / name.replace("-", "_")
    (src / Path(module).parent).mkdir(parents=True, exist_ok=True)
    (pkg / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "0"\ndependencies = {deps!r}\n'.replace("'", '"')
    )
    (src / module).write_text(source)
    return src / module


def test_checker_reports_an_upward_import(tmp_path):
    bad = _fake_package(
        tmp_path,
        "tq-core",
        ["mlx"],
        "rotation.py",
        "import mlx.core\n\ndef f():\n    from tq_cli import main\n",
    )
    violations = rules.check(tmp_path)
    assert [(v.file, v.line, v.package, v.imported) for v in violations] == [
        (bad, 4, "tq-core", "tq_cli")
    ]
    assert "rotation.py:4: tq-core imports tq_cli" in str(violations[0])


def test_checker_reports_sibling_and_mlx_lm_outside_the_extra(tmp_path):
    _fake_package(
        tmp_path,
        "tq-stream",
        ["tq-core[lm]", "tq-kernels"],
        "reader.py",
        "import tq_kvcache\nimport mlx_lm\nfrom tq_core import x\n",
    )
    _fake_package(tmp_path, "tq-core", ["mlx"], "weights.py", "import mlx_lm.utils\n")
    _fake_package(tmp_path, "tq-core", ["mlx"], "lm/load.py", "from mlx_lm import utils\n")
    got = sorted((v.package, v.imported, v.file.name) for v in rules.check(tmp_path))
    assert got == [("tq-core", "mlx_lm", "weights.py"), ("tq-stream", "tq_kvcache", "reader.py")]
