"""CUDA kernel tests, in their own pytest process, in one of two modes:

    NUMBA_ENABLE_CUDASIM=1 python -m pytest -q tests/gpu     the CUDA simulator, any machine (CI)
    MINIMAMBA_GPU_TESTS=1  python -m pytest -q tests/gpu     a real GPU, with CuPy arrays

The variable must be set before numba is imported, hence the separate process.
Without either, every test here is skipped (and the main suite does not collect them).
"""

import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # gpu_helpers, and tests/ for fake_cupy

from gpu_helpers import GPU, SIMULATOR  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if SIMULATOR or GPU:
        return
    skip = pytest.mark.skip(reason="CUDA kernel tests need NUMBA_ENABLE_CUDASIM=1 (simulator) or "
                                   "MINIMAMBA_GPU_TESTS=1 (real GPU), set before numba is imported")
    for item in items:
        if str(item.fspath).startswith(HERE):
            item.add_marker(skip)


@pytest.fixture
def kc(monkeypatch):
    """minimamba.kernels.cuda, with 32-thread blocks so small shapes cross block edges."""
    pytest.importorskip("numba.cuda")
    from minimamba.kernels import cuda

    monkeypatch.setattr(cuda, "THREADS", 32)
    return cuda


@pytest.fixture
def device():
    """(to_device, to_host): NumPy in and out of the kernels' arrays (CuPy on a GPU)."""
    if SIMULATOR:
        return (lambda a: None if a is None else np.array(a)), np.asarray
    cupy = pytest.importorskip("cupy")
    return (lambda a: None if a is None else cupy.asarray(a)), cupy.asnumpy
