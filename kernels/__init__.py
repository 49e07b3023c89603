"""minimamba.kernels: the fast twins of minimamba.ops (Numba CPU, Numba CUDA), same signatures.

Importing this package changes nothing in Numba. When the user opted in with
`minimamba.tune_threads()`, `tune_numba()` (run then, or here at import) adds:

On CPUs with AVX-512, LLVM by default keeps its loops to 256-bit vectors
(the "prefer-256-bit" tuning, chosen because some older chips slow their clock
for 512-bit work). The scan's inner loops are pure SIMD arithmetic, and 512-bit
vectors make the 130m-shape scan over 512 tokens 1.4x faster on the reference
machine (5.3 ms -> 3.7 ms per layer). So, when the user has set neither
NUMBA_CPU_NAME nor NUMBA_CPU_FEATURES and Numba has compiled nothing yet, the host's
features are handed to Numba (numba.config.CPU_FEATURES, not the environment) with
that tuning switched off. Numba's disk cache keys compiled code by these features,
so nothing compiled under other settings is reused by mistake. Then Numba's thread
pool is started with a short OpenMP spin (minimamba.threads.tune_numba_pool).
"""

import os


def _prefer_512_bit_vectors() -> str:
    from numba.core import config  # numba.config: the settings module the compiler reads

    if "NUMBA_CPU_NAME" in os.environ or "NUMBA_CPU_FEATURES" in os.environ:
        return "the user's NUMBA_CPU_NAME / NUMBA_CPU_FEATURES"
    from numba.core.registry import cpu_target

    if "_toplevel_target_context" in vars(cpu_target):  # its code generator exists: too late to change
        return "vectors left alone (Numba had compiled already)"
    try:
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features()
    except Exception:  # no feature query on this platform
        return "vectors left alone"
    if not features.get("avx512f"):
        return "no AVX-512"
    config.CPU_FEATURES = features.flatten() + ",-prefer-256-bit"
    return "512-bit vectors"


def tune_numba() -> str:
    """The Numba half of minimamba.tune_threads(): vector width, then the thread pool's spin."""
    from minimamba import threads

    text = f"{_prefer_512_bit_vectors()}, {threads.tune_numba_pool()}"
    threads.record_numba(text)
    return text


def _tune_if_asked():
    from minimamba import threads

    if threads.tuned():
        try:
            tune_numba()
        except ImportError:  # no numba: the kernels that need it say so when imported
            pass


_tune_if_asked()
