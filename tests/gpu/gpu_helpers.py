"""Shared mode flags and checks for tests/gpu."""

import os

import numpy as np

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
GPU = not SIMULATOR and os.environ.get("MINIMAMBA_GPU_TESTS") == "1"


def assert_close(name, got, ref, tol):
    """max |got - ref| <= tol * (1 + max |ref|), printing the errors either way."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    err = float(np.abs(got - ref).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    print(f"{name}: max abs err {err:.3e}, max rel err {err / max(scale, 1e-30):.3e} (|ref| <= {scale:.3g})")
    assert err <= tol * (1 + scale), f"{name}: max abs err {err:.3e} > {tol:.1e} * (1 + {scale:.3g})"
