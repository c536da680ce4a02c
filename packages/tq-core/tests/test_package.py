"""Package-level checks for tq_core: version matches pyproject, every public name resolves."""

import pathlib

import tomllib
import tq_core


def test_version_matches_pyproject():
    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert tq_core.__version__ == declared


def test_public_api_resolves():
    assert "__version__" in tq_core.__all__
    for name in tq_core.__all__:
        assert hasattr(tq_core, name), name
