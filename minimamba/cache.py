"""MambaCache: the constant-size state that decoding carries from token to token.

Per layer, two arrays, whatever the length of the context:
    conv_states[i]  (b, e, k)  the last k pre-conv inputs x (after masking)
    ssm_states[i]   (b, e, n)  the SSM state h, float32 (float64 in float64 mode)

A cache belongs to one sequence of calls: two calls that use it at the same time
(two threads sharing it) would each overwrite the other's state. `in_use` makes
the second of them raise instead; a model serves many threads at once when each
has its own cache.
"""

from __future__ import annotations

import contextlib
import threading

from .backend import get_backend, resolve_dtype
from .config import MambaConfig


class MambaCache:
    def __init__(self, config: MambaConfig, max_batch_size: int, dtype="float32", backend="numpy"):
        self.config = config
        self.max_batch_size = max_batch_size
        self.dtype = resolve_dtype(dtype)
        self.backend = get_backend(backend)
        xp, e = self.backend.xp, config.intermediate_size
        self.conv_states = [xp.zeros((max_batch_size, e, config.conv_kernel), dtype=self.dtype)
                            for _ in range(config.num_hidden_layers)]
        self.ssm_states = [xp.zeros((max_batch_size, e, config.state_size), dtype=self.dtype)
                           for _ in range(config.num_hidden_layers)]
        self.seqlen_offset = 0  # tokens seen so far
        self._lock = threading.Lock()  # held while a model call reads and writes the states

    @contextlib.contextmanager
    def in_use(self):
        """Held for the length of one model call; a second call on this cache meanwhile raises."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this MambaCache is already in use by another model call (another thread?); "
                               "give each thread its own cache: MambaCache(config, batch_size) or use_cache=True")
        try:
            yield self
        finally:
            self._lock.release()

    def update_conv_state(self, layer_idx: int, new_conv_state):
        self.conv_states[layer_idx][...] = new_conv_state
        return self.conv_states[layer_idx]

    def update_ssm_state(self, layer_idx: int, new_ssm_state):
        self.ssm_states[layer_idx][...] = new_ssm_state
        return self.ssm_states[layer_idx]

    def reset(self):
        for state in self.conv_states + self.ssm_states:
            state[...] = 0
        self.seqlen_offset = 0

    def nbytes(self) -> int:
        return sum(int(s.nbytes) for s in self.conv_states + self.ssm_states)

    def __repr__(self):
        return (f"MambaCache(layers={len(self.ssm_states)}, batch={self.max_batch_size}, "
                f"seen={self.seqlen_offset}, {self.nbytes() / 1e6:.2f} MB)")


def cache_in_use(cache_params):
    """`cache_params.in_use()`, or nothing to hold when there is no cache."""
    return contextlib.nullcontext() if cache_params is None else cache_params.in_use()
