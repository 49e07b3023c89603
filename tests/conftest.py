"""Shared fixtures: tiny random-weight checkpoints in the HF layout, made on the fly."""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

# tests/gpu runs in its own process: NUMBA_ENABLE_CUDASIM=1 (simulator) or MINIMAMBA_GPU_TESTS=1 (a real GPU)
collect_ignore = [] if "1" in (os.environ.get("NUMBA_ENABLE_CUDASIM"), os.environ.get("MINIMAMBA_GPU_TESTS")) else ["gpu"]

from minimamba import MambaConfig, MambaForCausalLM  # noqa: E402

TINY = dict(vocab_size=61, hidden_size=24, state_size=3, num_hidden_layers=2, conv_kernel=2,
            time_step_rank=5, expand=2)


@pytest.fixture
def tiny_config():
    """Odd sizes in every dimension, so a transposed or swapped axis cannot go unnoticed."""
    return MambaConfig(**TINY)


@pytest.fixture
def tiny_model(tiny_config):
    return MambaForCausalLM(tiny_config, seed=0)


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model):
    """A folder with config.json and model.safetensors, as transformers would write it."""
    folder = tmp_path / "tiny"
    tiny_model.save_pretrained(folder)
    return folder


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
