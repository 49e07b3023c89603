"""A memory-bandwidth probe for `minimamba bench --roofline`.

    parallel_sum  v1  prange over chunks of a 1-D float32 array, all threads reading
                      at once: what decode's matrix-vector products need from memory.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, fastmath=True)
def parallel_sum(a):
    chunk = 1 << 16
    nchunks = (a.size + chunk - 1) // chunk
    total = 0.0
    for j in prange(nchunks):
        s = np.float32(0)
        for i in range(j * chunk, min((j + 1) * chunk, a.size)):
            s += a[i]
        total += s
    return total
