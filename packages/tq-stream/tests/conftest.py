"""Test setup for tq-stream: the tests import their tiny-model builders from this folder."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests import moe_models
