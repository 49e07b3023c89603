"""minimamba.kernels: the fast twins of minimamba.ops (Numba CPU, Numba CUDA), same signatures.

On CPUs with AVX-512, LLVM by default keeps its loops to 256-bit vectors
(the "prefer-256-bit" tuning, chosen because some older chips slow their clock
for 512-bit work). The scan's inner loops are pure SIMD arithmetic, and 512-bit
vectors make the 130m-shape scan over 512 tokens 1.4x faster on the reference
machine (5.3 ms -> 3.7 ms per layer). So, when Numba has not been imported yet and
the user has set neither NUMBA_CPU_NAME nor NUMBA_CPU_FEATURES, the host's
features are handed to Numba with that tuning switched off. Numba's disk cache
keys compiled code by these features, so nothing compiled under other settings
is reused by mistake. MINIMAMBA_THREAD_SETTINGS=0 leaves Numba's choice alone.
"""

import os
import sys


def _prefer_512_bit_vectors():
    from minimamba import threads

    if (not threads.ENABLED or "numba" in sys.modules
            or "NUMBA_CPU_NAME" in os.environ or "NUMBA_CPU_FEATURES" in os.environ):
        return
    try:
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features()
    except Exception:  # no llvmlite (no numba: the CPU kernels are not available anyway) or no feature query
        return
    if features.get("avx512f"):
        os.environ["NUMBA_CPU_FEATURES"] = features.flatten() + ",-prefer-256-bit"
        threads.SET_HERE.append("NUMBA_CPU_FEATURES")


_prefer_512_bit_vectors()
