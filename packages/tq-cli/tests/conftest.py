"""Fixtures for the tq-cli tests: offline model caches, a tiny float and TurboQuant llama.

No network: the model cache is redirected to a temporary ``$TQ_MODELS_DIR`` and the Hugging
Face hub is switched off.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import tq_cli_testkit

from tq_cli import main  # noqa: E402
from tq_cli_testkit import write_text, write_tiny_llama  # noqa: E402


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    """Model caches in the test's temporary directory; no Hugging Face hub."""
    monkeypatch.setenv("TQ_MODELS_DIR", str(tmp_path / "models-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return tmp_path / "models-cache"


@pytest.fixture(scope="session")
def float_model(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("float") / "tiny-llama")


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("data") / "words.txt")


@pytest.fixture(scope="session")
def tq_model(float_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("tq") / "tiny-tq4"
    assert main(["convert", "--model", str(float_model), "--out", str(out)]) == 0
    return out
