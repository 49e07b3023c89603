"""MambaCache: the constant-size state that decoding carries from token to token.

Per layer, two arrays, whatever the length of the context:
    conv_states[i]  (b, e, k)  the last k pre-conv inputs x (after masking)
    ssm_states[i]   (b, e, n)  the SSM state h, float32 (float64 in float64 mode)
"""

from __future__ import annotations

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
