"""Numba CPU kernels for training: the selective scan forward and its backward.

Readable twin: `minimamba.training.backward.selective_scan_forward` /
`selective_scan_backward` (same arguments, same results; tests compare them).

Layout is the training one, time before channels, so that every array the
matmuls make is used without a transpose:
    u, delta, dy   (b, l, e)   post-conv input, post-softplus step size, grad of y
    A              (e, n)      negative real (A = -exp(A_log))
    B, C           (b, l, n)   selective (one B_t, C_t shared by all channels)
    D              (e,)

Versions (llm.c habit: say what each one parallelises over):
    scan_forward   v1: one thread per batch row (prange over b); inside, time steps
                   in order, channels and states in the inner loops (contiguous in e, n).
                   Saves only the state entering each chunk of `chunk` steps:
                   (b, ceil(l / chunk), e, n), not the (b, l, e, n) of every step.
    scan_backward  v1: one thread per batch row. Chunks in reverse; each chunk first
                   recomputes its `chunk` states from the saved boundary state (keeping
                   exp(delta A) too, so the reverse sweep needs no exp), then runs the
                   reverse-time recurrence dh_{t-1} = exp(delta_t A) * dh_t. The same
                   recompute-from-chunk-boundaries plan as the paper's kernel (Section 3.3.2),
                   there in SRAM, here in a per-thread buffer of (chunk + 1, e, n).
Gradients of A and D sum over the batch: each thread writes its own row of a
(b, e, n) / (b, e) buffer and the rows are summed after the parallel loop
(no races; the result does not depend on the number of threads).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

DEFAULT_CHUNK = 64


@nb.njit(parallel=True, cache=True)
def _scan_forward(u, delta, A, B, C, D, chunk):
    b, l, e = u.shape
    n = A.shape[1]
    n_chunks = (l + chunk - 1) // chunk
    y = np.empty_like(u)  # (b, l, e)
    h_start = np.empty((b, n_chunks, e, n), dtype=u.dtype)  # state entering each chunk
    for bi in nb.prange(b):
        h = np.zeros((e, n), dtype=u.dtype)  # (e, n)
        for t in range(l):
            if t % chunk == 0:
                h_start[bi, t // chunk] = h
            for ei in range(e):
                dt = delta[bi, t, ei]
                dtu = dt * u[bi, t, ei]
                acc = 0.0
                for ni in range(n):
                    hv = math.exp(dt * A[ei, ni]) * h[ei, ni] + dtu * B[bi, t, ni]
                    h[ei, ni] = hv
                    acc += hv * C[bi, t, ni]
                y[bi, t, ei] = acc + D[ei] * u[bi, t, ei]
    return y, h_start


@nb.njit(parallel=True, cache=True)
def _scan_backward(u, delta, A, B, C, D, h_start, dy, chunk):
    b, l, e = u.shape
    n = A.shape[1]
    n_chunks = h_start.shape[1]
    du = np.empty_like(u)
    ddelta = np.empty_like(u)
    dB = np.zeros_like(B)
    dC = np.zeros_like(C)
    dA_rows = np.zeros((b, e, n), dtype=u.dtype)
    dD_rows = np.zeros((b, e), dtype=u.dtype)
    for bi in nb.prange(b):
        dh = np.zeros((e, n), dtype=u.dtype)  # dL/dh_t from the future: exp(delta_{t+1} A) * dh_{t+1}
        hs = np.empty((chunk + 1, e, n), dtype=u.dtype)  # hs[0] enters the chunk, hs[s+1] after step s
        decay = np.empty((chunk, e, n), dtype=u.dtype)  # exp(delta_t A), kept from the recompute
        for c in range(n_chunks - 1, -1, -1):
            t0 = c * chunk
            t1 = min(t0 + chunk, l)
            hs[0] = h_start[bi, c]
            for t in range(t0, t1):  # recompute this chunk's states
                s = t - t0
                for ei in range(e):
                    dt = delta[bi, t, ei]
                    dtu = dt * u[bi, t, ei]
                    for ni in range(n):
                        a = math.exp(dt * A[ei, ni])
                        decay[s, ei, ni] = a
                        hs[s + 1, ei, ni] = a * hs[s, ei, ni] + dtu * B[bi, t, ni]
            for t in range(t1 - 1, t0 - 1, -1):  # reverse-time recurrence
                s = t - t0
                for ei in range(e):
                    g = dy[bi, t, ei]
                    dt = delta[bi, t, ei]
                    uu = u[bi, t, ei]
                    dD_rows[bi, ei] += g * uu
                    ddt = 0.0
                    duu = g * D[ei]
                    for ni in range(n):
                        bt = B[bi, t, ni]
                        dC[bi, t, ni] += g * hs[s + 1, ei, ni]
                        dhv = dh[ei, ni] + g * C[bi, t, ni]  # total dL/dh_t
                        a = decay[s, ei, ni]
                        da = dhv * hs[s, ei, ni]  # dL/d exp(delta_t A)
                        ddt += da * a * A[ei, ni] + dhv * bt * uu
                        dA_rows[bi, ei, ni] += da * a * dt
                        dB[bi, t, ni] += dhv * dt * uu
                        duu += dhv * dt * bt
                        dh[ei, ni] = dhv * a
                    du[bi, t, ei] = duu
                    ddelta[bi, t, ei] = ddt
    return du, ddelta, dA_rows.sum(axis=0), dB, dC, dD_rows.sum(axis=0)


def _check(u, delta, A, B, C, D):
    if u.ndim != 3:
        raise ValueError(f"u must have shape (batch, seqlen, dim), got {u.shape}")
    b, l, e = u.shape
    if A.ndim != 2 or A.shape[0] != e:
        raise ValueError(f"A has shape {A.shape}, expected ({e}, dstate)")
    n = A.shape[1]
    for name, arr, shape in (("delta", delta, (b, l, e)), ("B", B, (b, l, n)), ("C", C, (b, l, n)), ("D", D, (e,))):
        if tuple(arr.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {shape}")


def _same_dtype(dtype, *arrays):
    return tuple(np.ascontiguousarray(a, dtype=dtype) for a in arrays)


def scan_forward(u, delta, A, B, C, D, chunk=DEFAULT_CHUNK):
    """y (b, l, e) and the chunk-boundary states (b, ceil(l/chunk), e, n). See the module docstring."""
    _check(u, delta, A, B, C, D)
    dtype = np.float64 if u.dtype == np.float64 else np.float32
    return _scan_forward(*_same_dtype(dtype, u, delta, A, B, C, D), int(chunk))


def scan_backward(u, delta, A, B, C, D, h_start, dy, chunk=DEFAULT_CHUNK):
    """du, ddelta (b, l, e); dA (e, n); dB, dC (b, l, n); dD (e,) from dy = dL/dy (b, l, e)."""
    _check(u, delta, A, B, C, D)
    dtype = np.float64 if u.dtype == np.float64 else np.float32
    u, delta, A, B, C, D, h_start, dy = _same_dtype(dtype, u, delta, A, B, C, D, h_start, dy)
    return _scan_backward(u, delta, A, B, C, D, h_start, dy, int(chunk))
