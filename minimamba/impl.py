"""Which implementation of the four kernels a model calls.

    reference  the plain per-step loop (`ops.selective_scan_ref`), for reading and checking
    numpy      the vectorised NumPy/CuPy functions of `minimamba.ops`
    numba      the Numba CPU kernels of `minimamba.kernels.cpu` (needs numba)
    cuda       the Numba CUDA kernels of `minimamba.kernels.cuda` (needs numba-cuda and CuPy arrays)

All four take the same arguments (those of `minimamba.ops`); tests compare them.
"""

from __future__ import annotations

from types import SimpleNamespace

from . import ops

IMPLS = ("reference", "numpy", "numba", "cuda")
KERNEL_NAMES = ("selective_scan_fn", "selective_state_update", "causal_conv1d_fn", "causal_conv1d_update",
                "rms_norm")


def _namespace(name, module, **overrides):
    # A module without its own twin of a function (the CUDA kernels have no rms_norm) uses ops'.
    funcs = {k: overrides.get(k, getattr(module, k, getattr(ops, k))) for k in KERNEL_NAMES}
    return SimpleNamespace(name=name, **funcs)


def resolve_impl(impl=None, backend_name="numpy") -> SimpleNamespace:
    """The kernels for `impl`; None or "auto" picks the fastest one available (on NumPy arrays: per call)."""
    if impl in (None, "auto"):
        if backend_name == "numpy":  # per call NumPy or Numba, from measured crossovers; Numba loads when needed
            from .dispatch import auto_kernels

            return auto_kernels(KERNEL_NAMES)
        try:
            return resolve_impl("cuda", backend_name)
        except ImportError:
            return resolve_impl("numpy", backend_name)
    if impl == "reference":
        return _namespace("reference", ops, selective_scan_fn=ops.selective_scan_ref)
    if impl == "numpy":
        return _namespace("numpy", ops)
    if impl == "numba":
        if backend_name != "numpy":
            raise ValueError("impl='numba' runs on NumPy arrays; use impl='cuda' with backend='cupy'")
        from .kernels import cpu  # ImportError when numba is missing

        return _namespace("numba", cpu)
    if impl == "cuda":
        if backend_name != "cupy":
            raise ValueError("impl='cuda' needs backend='cupy' (CuPy arrays on the GPU)")
        from .kernels import cuda

        return _namespace("cuda", cuda)
    raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)} or 'auto'")
