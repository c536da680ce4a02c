"""Package-level checks for tq_kvcache: version matches pyproject, every public name resolves."""

import pathlib

import tomllib
import tq_kvcache


def test_version_matches_pyproject():
    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert tq_kvcache.__version__ == declared


def test_public_api_resolves():
    assert "__version__" in tq_kvcache.__all__
    for name in tq_kvcache.__all__:
        assert hasattr(tq_kvcache, name), name
