"""The bench tests share the engine tests' checkpoints."""

from tests.engine.conftest import tiny_llama

__all__ = ["tiny_llama"]
