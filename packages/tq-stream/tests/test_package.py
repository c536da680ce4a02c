"""Package-level checks for tq_stream: version matches pyproject, every public name resolves."""

import pathlib

import tomllib
import tq_stream


def test_version_matches_pyproject():
    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert tq_stream.__version__ == declared


def test_public_api_resolves():
    assert "__version__" in tq_stream.__all__
    for name in tq_stream.__all__:
        assert hasattr(tq_stream, name), name
