"""Tiny random backbones (the real model classes) written once per session, synthetic clips."""

from __future__ import annotations

import os

import pytest

from tests.inference.conftest import one_thread  # noqa: F401  (autouse: tiny ops run faster on one thread)

# Nothing here may reach a model hub: a download attempt fails instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory) -> dict:
    """``{backbone: path}`` of random tiny checkpoints (PANNs is full size: its widths are fixed)."""
    from megatron_ualm.evaluation import testing

    return testing.write_all(tmp_path_factory.mktemp("backbones"))


@pytest.fixture(scope="session")
def loaded_backbones(tiny_backbones) -> dict:
    from megatron_ualm.evaluation.generation import load_backbones

    return load_backbones(tiny_backbones, device="cpu")
