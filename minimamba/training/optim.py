"""AdamW, the learning-rate schedule and gradient clipping, in NumPy.

AdamW is Loshchilov & Hutter (2019), Algorithm 2, as torch.optim.AdamW computes it:
    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    p -= lr * wd * p                                  (decoupled weight decay)
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
"""

from __future__ import annotations

import math

import numpy as np


def decays(name: str) -> bool:
    """Weight decay on the matrices of the linear layers and the embedding only.

    Not on norms, biases, D, the conv taps or A_log (decaying A_log would pull
    every state's decay rate towards 1, a change of the model, not a regulariser).
    """
    return name.endswith(("proj.weight", "embeddings.weight", "lm_head.weight", "lora_A.weight",
                          "lora_B.weight", "lora_embedding_A", "lora_embedding_B"))


class AdamW:
    def __init__(self, params: dict, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        self.params = params  # {name: array}, updated in place
        self.lr = lr
        self.b1, self.b2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.step_count = 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads: dict, lr=None):
        lr = self.lr if lr is None else lr
        self.step_count += 1
        t = self.step_count
        c1 = 1 - self.b1 ** t
        c2 = 1 - self.b2 ** t
        for name, p in self.params.items():
            g = grads[name]
            m, v = self.m[name], self.v[name]
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * (g * g)
            if self.weight_decay and decays(name):
                p *= 1 - lr * self.weight_decay
            p -= (lr / c1) * m / (np.sqrt(v / c2) + self.eps)

    def state_arrays(self) -> dict:
        out = {f"m.{k}": v for k, v in self.m.items()}
        out.update({f"v.{k}": v for k, v in self.v.items()})
        return out

    def load_state_arrays(self, arrays: dict, step_count: int):
        for k in self.params:
            self.m[k][...] = arrays[f"m.{k}"]
            self.v[k][...] = arrays[f"v.{k}"]
        self.step_count = step_count


def lr_at(step: int, max_lr: float, warmup: int, total: int, min_ratio=0.1) -> float:
    """Linear warmup over `warmup` steps, then a cosine from max_lr down to min_ratio * max_lr at `total`."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / global L2 norm), in place; returns the norm before clipping."""
    total = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    if max_norm and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads.values():
            g *= scale
    return total
