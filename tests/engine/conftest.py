"""Checkpoints shared by the engine tests, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.make_model import make_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("llama", "tiny", tmp_path_factory.mktemp("tiny-llama"), seed=0)
