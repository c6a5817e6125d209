"""Shared test set-up: CPU shims before anything touches Megatron, one parallel state."""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest

from megatron_ualm.compat import cpu as cpu_compat

cpu_compat.apply()


@pytest.fixture(scope="session")
def parallel_world_of_one():
    """Megatron parallel state with TP = PP = 1 in this process (single-process tests)."""
    from megatron_ualm import api

    api.initialize_parallel(seed=1234, timeout_minutes=2)
    yield
