"""Thread tuning for a prefill on few cores: one explicit call, never a side effect of `import minimamba`.

    import minimamba
    minimamba.tune_threads()   # a library user opts in; the `minimamba` command and `minimamba bench` do

Why. A prefill alternates between NumPy's matmuls (OpenBLAS's thread pool) and the
Numba kernels (Numba's OpenMP pool). After its work each pool keeps its threads
spinning for a while (OpenBLAS for 2^28 cycles, about 0.1 s; GNU OpenMP for 300,000
spins), so on a machine with few cores the two pools take the cores from each other:
on the 2-core reference machine a 512-token prefill of the 130m shape took 0.97 s
with the default spins and 0.62 s with these. Decode keeps its speed: 2^20 cycles
(~0.4 ms) is still longer than the gap between two matmuls of a decode step.

What, at call time, whatever was imported first (no environment variable is left set):
  OpenBLAS  its spin timeout becomes 2^20 cycles: OpenBLAS reads OPENBLAS_THREAD_TIMEOUT=20
            again (its exported openblas_read_env, the variable set only for that call)
            and restarts its threads (blas_thread_shutdown_; the next matmul starts them).
            The library is found through threadpoolctl (a dependency: small, pure Python).
  Numba     GOMP_SPINCOUNT=10000 for Numba's OpenMP pool, set only while Numba starts its
            threads (now, or when a kernel is first needed), and on AVX-512 CPUs 512-bit
            vectors for the kernels (minimamba/kernels/__init__.py). Other libraries'
            OpenMP copies (torch ships its own libgomp) do not see it.
A value the user set in the environment wins. Call it while no other thread runs BLAS.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

OPENBLAS_THREAD_TIMEOUT = "20"  # 2^20 cycles
GOMP_SPINCOUNT = "10000"

_state = {"tuned": False, "openblas": "not tuned", "numba": "not tuned"}


@contextlib.contextmanager
def _env(name, value):
    """`name=value` in the environment for the block only (the user's own value wins)."""
    if name in os.environ:
        yield os.environ[name]
        return
    os.environ[name] = value
    try:
        yield value
    finally:
        os.environ.pop(name, None)


def _tune_openblas() -> str:
    had_kmp = "KMP_DUPLICATE_LIB_OK" in os.environ
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "left alone (threadpoolctl is not installed: pip install threadpoolctl)"
    finally:
        if not had_kmp:  # threadpoolctl's import sets it for Intel's OpenMP; not ours to leave behind
            os.environ.pop("KMP_DUPLICATE_LIB_OK", None)
    import numpy  # noqa: F401 - its OpenBLAS must be loaded to be found

    libs = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
    if not libs:
        return "left alone (NumPy's BLAS is not OpenBLAS)"
    done = []
    for info in libs:
        try:
            lib = ctypes.CDLL(info["filepath"])
            read_env, shutdown, timeout = lib.openblas_read_env, lib.blas_thread_shutdown_, lib.openblas_thread_timeout
        except (OSError, AttributeError):
            done.append(f"{os.path.basename(info['filepath'])} left alone (no openblas_read_env)")
            continue
        with _env("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT):
            read_env()
        shutdown()  # its threads restart at the next matmul, with the new timeout
        done.append(f"OPENBLAS_THREAD_TIMEOUT={timeout()}")
    return ", ".join(done)


def tune_numba_pool() -> str:
    """Start Numba's thread pool with GOMP_SPINCOUNT set (only then read); called when Numba loads, if tuned."""
    import numba
    from numba.np.ufunc import parallel

    if getattr(parallel, "_is_initialized", False):
        return f"Numba's {numba.threading_layer()} pool was already running: left alone"
    with _env("GOMP_SPINCOUNT", GOMP_SPINCOUNT) as value:
        parallel._launch_threads()
    layer = numba.threading_layer()
    return f"GOMP_SPINCOUNT={value}" if layer == "omp" else f"Numba's {layer} pool (no spin setting)"


def tune_threads() -> str:
    """Tune OpenBLAS's and Numba's thread pools for minimamba's prefill (see the module's docstring).

    Returns the settings now in force, one line. Idempotent; the Numba part takes
    effect when Numba loads, which impl="auto" does only when a call needs it.
    """
    _state["tuned"] = True
    _state["openblas"] = _tune_openblas()
    untouched = _state["numba"] in ("not tuned", "tuned when Numba loads")  # else an earlier call's record stands
    if sys.modules.get("minimamba.kernels") is not None and untouched:  # the kernels are loaded: tune Numba now
        from .kernels import tune_numba

        try:
            _state["numba"] = tune_numba()
        except ImportError:
            _state["numba"] = "not installed"
    elif _state["numba"] == "not tuned":
        _state["numba"] = "tuned when Numba loads"
    return note()


def tuned() -> bool:
    return _state["tuned"]


def record_numba(text: str):
    _state["numba"] = text


def note() -> str:
    """One line for benchmarks: what tune_threads() did, or that it was not called."""
    if not _state["tuned"]:
        return "threads untuned (a library user's default; minimamba.tune_threads() opts in)"
    return f"threads tuned: OpenBLAS {_state['openblas']}; Numba {_state['numba']}"
