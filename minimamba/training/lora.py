"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Eq. 3).

A frozen weight W (out, in) gets a trainable low-rank update:

    y = x W^T + (alpha / r) * dropout(x) A^T B^T       A (r, in), B (out, r), B = 0 at the start

and an embedding E (V, d) gets  E[ids] + (alpha / r) * A^T[ids] B^T  with A (r, V), B (d, r)
(no dropout on embeddings, as PEFT). This module holds the adapter arrays, their
forward and hand-derived backward, merging, and reading/writing PEFT's file format.
"""

from __future__ import annotations

import math

import numpy as np


class LoraAdapter:
    """The two factors of one module's update, and how they are applied.

    kind "linear": A (r, in), B (out, r), names lora_A.weight / lora_B.weight.
    kind "embedding": A (r, V), B (d, r), names lora_embedding_A / lora_embedding_B.
    """

    def __init__(self, kind, A, B, alpha, dropout=0.0):
        if kind not in ("linear", "embedding"):
            raise ValueError(f"LoRA kind must be 'linear' or 'embedding', got {kind!r}")
        self.kind = kind
        self.A = A
        self.B = B
        self.r = A.shape[0]
        self.alpha = alpha
        self.dropout = float(dropout)

    @property
    def scale(self):
        return self.alpha / self.r

    def names(self):
        return ("lora_A.weight", "lora_B.weight") if self.kind == "linear" else ("lora_embedding_A", "lora_embedding_B")

    def named_arrays(self):
        a, b = self.names()
        return {a: self.A, b: self.B}

    def delta_weight(self):
        """The update to the base weight, in the base weight's layout: (out, in) or (V, d)."""
        if self.kind == "linear":
            return self.scale * (self.B @ self.A)  # (out, in)
        return self.scale * (self.B @ self.A).T  # (V, d)


def init_adapter(kind, base_shape, r, alpha, dropout, rng, dtype=np.float32):
    """PEFT's default init: A Kaiming-uniform (linear) or normal (embedding), B zero, so the model starts unchanged.

    NOTE: for embeddings PEFT zeroes A and draws B normal instead; either way the product is zero.
    """
    out_dim, in_dim = base_shape
    if kind == "linear":
        bound = math.sqrt(6.0 / ((1 + 5.0) * in_dim))  # kaiming_uniform_(a=sqrt(5)), fan_in = in
        A = rng.uniform(-bound, bound, (r, in_dim)).astype(dtype)
        B = np.zeros((out_dim, r), dtype=dtype)
    else:  # base (V, d): A (r, V) zero, B (d, r) normal
        A = np.zeros((r, out_dim), dtype=dtype)
        B = rng.normal(0.0, 1.0, (in_dim, r)).astype(dtype)
    return LoraAdapter(kind, A, B, alpha, dropout)


# ---------------------------------------------------------------- forward and backward


def lora_linear_forward(x, adapter, rng=None):
    """(alpha/r) * dropout(x) A^T B^T; dropout only when `rng` is given (training)."""
    mask = None
    if rng is not None and adapter.dropout > 0:
        keep = 1.0 - adapter.dropout
        mask = (rng.random(x.shape) < keep).astype(x.dtype) / keep  # inverted dropout, as torch
        x = x * mask
    low = x @ adapter.A.T  # (..., r)
    return adapter.scale * (low @ adapter.B.T), (x, low, mask)  # (..., out)


def lora_linear_backward(dy, saved, adapter):
    """With s = alpha/r, xd = dropout(x), low = xd A^T:
        dB = s dy^T low      dA = s (dy B)^T xd      dx = s (dy B) A, times the dropout mask
    """
    xd, low, mask = saved
    s = adapter.scale
    dlow = s * (dy @ adapter.B)  # (..., r)
    dB = s * dy.reshape(-1, dy.shape[-1]).T @ low.reshape(-1, low.shape[-1])  # (out, r)
    dA = dlow.reshape(-1, dlow.shape[-1]).T @ xd.reshape(-1, xd.shape[-1])  # (r, in)
    dx = dlow @ adapter.A  # (..., in)
    if mask is not None:
        dx = dx * mask
    return dx, {"lora_A.weight": dA, "lora_B.weight": dB}


def lora_embedding_forward(ids, adapter):
    """(alpha/r) * A^T[ids] B^T: rows of A^T are looked up like an embedding."""
    low = adapter.A.T[ids]  # (b, l, r)
    return adapter.scale * (low @ adapter.B.T), (ids, low)  # (b, l, d)


def lora_embedding_backward(dout, saved, adapter):
    """dB = s dout^T low;  dA^T scatter-adds s (dout B) into the rows the ids read."""
    ids, low = saved
    s = adapter.scale
    dout2 = dout.reshape(-1, dout.shape[-1])  # (t, d)
    dB = s * dout2.T @ low.reshape(-1, low.shape[-1])  # (d, r)
    dlow = s * (dout2 @ adapter.B)  # (t, r)
    dAT = np.zeros((adapter.A.shape[1], adapter.r), dtype=dout.dtype)  # (V, r)
    np.add.at(dAT, ids.reshape(-1), dlow)
    return {"lora_embedding_A": dAT.T, "lora_embedding_B": dB}
