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
    v1 (git history): one Numba call per pass, exp inside the loops (scalar, not vectorised).
    v2 (this file): Python walks the chunks of `chunk` time steps; per chunk NumPy computes
       exp(delta A) (b, T, e, n) with its SIMD exp, and a Numba kernel with one thread per
       batch row (prange over b) runs the recurrence, channels and states innermost
       (contiguous in e and n).
    scan_forward keeps only the state entering each chunk, (b, ceil(l / chunk), e, n),
       not the (b, l, e, n) of every step.
    scan_backward walks the chunks in reverse; each chunk first recomputes its T states
       from the saved boundary state into a (b, T + 1, e, n) buffer, then runs the
       reverse-time recurrence dh_{t-1} = exp(delta_t A) * dh_t. The same
       recompute-from-chunk-boundaries plan as the paper's kernel (Section 3.3.2), which
       does it in SRAM.
Gradients of A sum over the batch: each thread writes its own row of a (b, e, n)
buffer and the rows are summed after the parallel loop (no races; the result does
not depend on the number of threads).
"""

from __future__ import annotations

import numba as nb
import numpy as np

DEFAULT_CHUNK = 64


# NOTE: exp(delta A) is computed by NumPy, one chunk at a time, outside the Numba loops:
# NumPy's float32 exp is SIMD-vectorised, a scalar exp in the loop is not (Numba has no
# vector math library here), and with the exp gone the remaining loops are multiply-adds.
# Reassociation lets LLVM vectorise the sums over n; NaN and inf keep their meaning.
FASTMATH = {"reassoc", "contract", "nsz"}


@nb.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _chunk_forward(u, delta, decay, B, C, D, h, y):
    """One chunk of T steps: h (b, e, n) goes in as the chunk's start state and comes out as its end state."""
    b, T, e = u.shape
    n = B.shape[2]
    for bi in nb.prange(b):
        for s in range(T):
            for ei in range(e):
                dtu = delta[bi, s, ei] * u[bi, s, ei]
                acc = 0.0
                for ni in range(n):
                    hv = decay[bi, s, ei, ni] * h[bi, ei, ni] + dtu * B[bi, s, ni]
                    h[bi, ei, ni] = hv
                    acc += hv * C[bi, s, ni]
                y[bi, s, ei] = acc + D[ei] * u[bi, s, ei]


@nb.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _chunk_backward(u, delta, decay, A, B, C, D, h0, dy, dh, hs, du, ddelta, dB, dC, dA_rows):
    """One chunk in reverse. dh (b, e, n) carries dL/dh from the chunk after; hs is a (b, T+1, e, n) buffer."""
    b, T, e = u.shape
    n = B.shape[2]
    for bi in nb.prange(b):
        hs[bi, 0] = h0[bi]
        for s in range(T):  # recompute the chunk's states from its start state
            for ei in range(e):
                dtu = delta[bi, s, ei] * u[bi, s, ei]
                for ni in range(n):
                    hs[bi, s + 1, ei, ni] = decay[bi, s, ei, ni] * hs[bi, s, ei, ni] + dtu * B[bi, s, ni]
        for s in range(T - 1, -1, -1):  # reverse-time recurrence
            for ei in range(e):
                g = dy[bi, s, ei]
                dt = delta[bi, s, ei]
                uu = u[bi, s, ei]
                ddt = 0.0
                duu = 0.0
                for ni in range(n):
                    bt = B[bi, s, ni]
                    dC[bi, s, ni] += g * hs[bi, s + 1, ei, ni]
                    dhv = dh[bi, ei, ni] + g * C[bi, s, ni]  # total dL/dh_t
                    a = decay[bi, s, ei, ni]
                    da = dhv * hs[bi, s, ei, ni] * a  # dL/d(exp(delta A)) times exp(delta A)
                    ddt += da * A[ei, ni] + dhv * bt * uu
                    dA_rows[bi, ei, ni] += da * dt
                    dB[bi, s, ni] += dhv * dt * uu
                    duu += dhv * bt
                    dh[bi, ei, ni] = dhv * a
                du[bi, s, ei] = duu * dt + g * D[ei]
                ddelta[bi, s, ei] = ddt


def _decay(delta, A):
    """exp(delta_t A) for a chunk: (b, T, e, n)."""
    return np.exp(delta[:, :, :, None] * A)


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
    u, delta, A, B, C, D = _same_dtype(dtype, u, delta, A, B, C, D)
    b, l, e = u.shape
    n = A.shape[1]
    n_chunks = (l + chunk - 1) // chunk
    y = np.empty_like(u)  # (b, l, e)
    h_start = np.empty((b, n_chunks, e, n), dtype=dtype)  # the state entering each chunk
    h = np.zeros((b, e, n), dtype=dtype)
    for c in range(n_chunks):
        t = slice(c * chunk, min((c + 1) * chunk, l))
        h_start[:, c] = h
        _chunk_forward(u[:, t], delta[:, t], _decay(delta[:, t], A), B[:, t], C[:, t], D, h, y[:, t])
    return y, h_start


def scan_backward(u, delta, A, B, C, D, h_start, dy, chunk=DEFAULT_CHUNK):
    """du, ddelta (b, l, e); dA (e, n); dB, dC (b, l, n); dD (e,) from dy = dL/dy (b, l, e)."""
    _check(u, delta, A, B, C, D)
    dtype = np.float64 if u.dtype == np.float64 else np.float32
    u, delta, A, B, C, D, h_start, dy = _same_dtype(dtype, u, delta, A, B, C, D, h_start, dy)
    b, l, e = u.shape
    n = A.shape[1]
    n_chunks = h_start.shape[1]
    if n_chunks != (l + chunk - 1) // chunk:
        raise ValueError(f"h_start holds {n_chunks} chunk states but l={l} with chunk={chunk} needs "
                         f"{(l + chunk - 1) // chunk}: use the chunk of the forward")
    du, ddelta = np.empty_like(u), np.empty_like(u)
    dB, dC = np.zeros_like(B), np.zeros_like(C)
    dA_rows = np.zeros((b, e, n), dtype=dtype)  # one row per batch row (per thread), summed below
    dh = np.zeros((b, e, n), dtype=dtype)
    hs = np.empty((b, chunk + 1, e, n), dtype=dtype)
    for c in range(n_chunks - 1, -1, -1):
        t = slice(c * chunk, min((c + 1) * chunk, l))
        _chunk_backward(u[:, t], delta[:, t], _decay(delta[:, t], A), A, B[:, t], C[:, t], D,
                        np.ascontiguousarray(h_start[:, c]), dy[:, t], dh, hs, du[:, t], ddelta[:, t],
                        dB[:, t], dC[:, t], dA_rows)
    dD = (dy * u).sum(axis=(0, 1))  # (e,)
    return du, ddelta, dA_rows.sum(axis=0), dB, dC, dD
