"""Shared fixtures: tiny models built offline, the shipped problems."""
import os

import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.fixture(scope="session")
def tiny_model_path():
    """Folder of the tiny random Qwen3 model (built once, offline)."""
    from qedlib.models import build_tiny
    return str(build_tiny())


@pytest.fixture(scope="session")
def tiny_generator(tiny_model_path):
    """A transformers generator around the tiny model."""
    from qedlib.config import Endpoint
    from qedlib.generation import make_generator
    return make_generator(Endpoint(model=tiny_model_path, batch_size=8, dtype="float32"))


@pytest.fixture(scope="session")
def shipped_problems():
    from qedlib.data import load_problems
    return load_problems("shipped")
