"""Shared by the Python tests.

CI sets SQZ_REQUIRE_HF=1 (scripts/test.sh): then a missing torch /
transformers / gguf is an error, not a skip, so the real-model tests can
never be skipped silently there. GPU tests skip where no CUDA device is.
"""
import importlib
import os

import pytest


def need(module: str):
    """Imports `module`, or skips the calling test module when it is missing
    (an error under SQZ_REQUIRE_HF=1)."""
    if os.environ.get("SQZ_REQUIRE_HF") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)
