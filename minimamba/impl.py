"""Which implementation of the four kernels a model calls.

    reference  the plain per-step loop (`ops.selective_scan_ref`), for reading and checking
    numpy      the vectorised NumPy/CuPy functions of `minimamba.ops`
    numba      the Numba CPU kernels of `minimamba.kernels.cpu` (needs numba)
    cuda       the Numba CUDA kernels of `minimamba.kernels.cuda` (needs numba-cuda and CuPy arrays)

All four take the same arguments (those of `minimamba.ops`); tests compare them.

`impl` may also be a mapping of the user's own functions for any of KERNEL_NAMES,
e.g. `impl={"selective_scan_fn": my_scan}`: the model then calls `my_scan` with the
arguments of `ops.selective_scan_fn`, and the other kernels come from the default
("auto"), or from `impl={"base": "reference", ...}` when named.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    """The kernels for `impl`; None or "auto" picks the fastest one available; a mapping plugs in functions."""
    if isinstance(impl, Mapping):
        return _plugged(impl, backend_name)
    if impl in (None, "auto"):
        preferred = ("cuda", "numpy") if backend_name == "cupy" else ("numba", "numpy")
        for name in preferred:
            try:
                return resolve_impl(name, backend_name)
            except ImportError:
                continue
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


def _plugged(funcs: Mapping, backend_name) -> SimpleNamespace:
    """The user's functions for some kernels, the default (or `funcs["base"]`) for the rest."""
    funcs = dict(funcs)
    base = funcs.pop("base", None)
    if isinstance(base, Mapping):
        raise ValueError("impl['base'] must name an implementation (e.g. 'numpy'), not a mapping")
    unknown = sorted(set(funcs) - set(KERNEL_NAMES))
    if unknown:
        raise ValueError(f"impl names unknown kernel(s) {unknown}; the kernels are {', '.join(KERNEL_NAMES)} "
                         "(and 'base' for the implementation the others come from)")
    for name, func in funcs.items():
        if not callable(func):
            raise ValueError(f"impl[{name!r}] must be a function, got {type(func).__name__}")
    default = resolve_impl(base, backend_name)
    name = f"{default.name}+" + ",".join(f"{k}={getattr(f, '__name__', 'custom')}" for k, f in funcs.items())
    return SimpleNamespace(name=name, **{k: funcs.get(k, getattr(default, k)) for k in KERNEL_NAMES})
