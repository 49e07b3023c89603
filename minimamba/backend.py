"""Array backends: where the model's arrays live (NumPy on the CPU, CuPy on a GPU).

One model code path serves both; the backend only says which array module
makes new arrays and how weights get there. CuPy is imported only when asked for.
"""

from __future__ import annotations

import numpy as np

DTYPES = {"float32": np.float32, "fp32": np.float32, "float64": np.float64, "fp64": np.float64}


def resolve_dtype(dtype) -> np.dtype:
    """The compute dtype: float32 (default) or float64 (ground truth)."""
    if dtype is None:
        return np.dtype(np.float32)
    key = dtype if isinstance(dtype, str) else getattr(np.dtype(dtype), "name", str(dtype))
    if key in DTYPES:
        return np.dtype(DTYPES[key])
    if key in ("float16", "fp16", "bfloat16", "bf16", "half"):
        raise ValueError(f"dtype {dtype!r}: minimamba computes in float32 or float64; float16 and bfloat16 "
                         "checkpoints load exactly into either")
    raise ValueError(f"unknown dtype {dtype!r}; choose 'float32' or 'float64'")


class Backend:
    """The array module (`xp`) plus the two transfers the model may make: in and out."""

    def __init__(self, name: str):
        if name == "numpy":
            self.xp = np
        elif name == "cupy":
            try:
                import cupy
            except ImportError:
                raise ImportError("backend 'cupy' needs CuPy: pip install cupy-cuda12x "
                                  "(cupy-cuda13x for CUDA 13; from the repository: pip install -e '.[gpu]')") from None
            try:
                cupy.cuda.runtime.getDeviceCount()
            except Exception as err:  # noqa: BLE001 - cupy raises CUDARuntimeError or others
                raise RuntimeError(f"backend 'cupy': CuPy is installed but no CUDA device is usable ({err})") from None
            self.xp = cupy
        else:
            raise ValueError(f"unknown backend {name!r}; choose 'numpy' or 'cupy'")
        self.name = name

    def asarray(self, array, dtype=None):
        """Host or device array -> this backend's array (a copy only when needed)."""
        return self.xp.asarray(array, dtype=dtype)

    def to_numpy(self, array):
        """This backend's array -> NumPy (the one device-to-host copy, made by the caller)."""
        return array.get() if self.name == "cupy" else np.asarray(array)

    def __repr__(self):
        return f"Backend({self.name!r})"


def get_backend(backend) -> Backend:
    return backend if isinstance(backend, Backend) else Backend(backend or "numpy")
