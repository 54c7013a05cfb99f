"""Shared fixtures: tiny random models (fast) and the real offline preset (integration)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# `dtype: auto` is float32 in the tests on every CPU (tests of the rule itself unset this),
# so results do not depend on whether the machine has native bfloat16.
os.environ.setdefault("REGAP_AUTO_DTYPE", "float32")
# The suite loads the CPUs itself, so the CLI's "other jobs are using the CPUs" warning would fire in
# whichever test invokes the CLI first and mix into output that test parses; its own tests reset this.
from regap import precision as _precision  # noqa: E402

_precision._busy_warned = True


def shared_data_dir() -> Path | None:
    """`../shared/data` beside the repository (or $REGAP_SHARED_DATA); None when absent."""
    explicit = os.environ.get("REGAP_SHARED_DATA")
    path = Path(explicit) if explicit else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models gain nothing from two, and two OpenMP threads
    on a busy 2-core machine spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model():
    from regap.models.random_tiny import tiny_random_lvlm

    return tiny_random_lvlm()


@pytest.fixture(scope="session")
def real_tiny():
    """The real `tiny` preset (converted once into the cache); skipped without the offline extra."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("onnx") is None:
        pytest.skip("offline extra not installed (pip install 'regap[offline]')")
    from regap.models import load_model

    return load_model("tiny", dtype="float32")


def pytest_collection_modifyitems(config, items):
    """The fast lane first: tests marked `slow` or `integration` run after all the others (the
    sort is stable), so a failure in the fast lane shows within the first minute of the one
    test command (`python -m pytest -q`); `-m "not slow and not integration"` runs the fast lane alone."""
    def lane(item) -> int:
        return 1 if item.get_closest_marker("slow") or item.get_closest_marker("integration") else 0

    items.sort(key=lane)
