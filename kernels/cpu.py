"""Numba CPU kernels for the four functions of `minimamba.ops`.

Same signatures, arguments and results as their readable twins in
`minimamba/ops.py` (tests/test_kernels_cpu.py compares them); only the speed
differs. Versions, and what each parallelises over:

    selective_scan_fn       v2  fused: softplus(delta + bias), exp(delta A), the state
                                update, C . h, D skip, silu(z) gate and the final state in
                                one pass; the state of one block of channels lives in a
                                small local array, so no (b, d, l, n) array exists.
                                prange over (batch x blocks of 16 channels).
    selective_state_update  v1  one step, state updated in place; serial for small
                                b * d (one decode step of one layer is ~25k numbers, less
                                than a thread hand-off costs), prange over batch x
                                channels above that.
    causal_conv1d_fn        v2  k taps per output, bias and SiLU fused, a rolling window of
    causal_conv1d_update        the last k inputs per block of channels; one core for both:
                                the update starts the window from conv_state and shifts it
                                in place at the end, so a long prefill through the cache
                                costs what the plain conv costs. prange over (batch x
                                blocks of channels), time inside; serial below PARALLEL_MIN.

Speed notes (2-core machine, float32):
  * exp is written out (range reduction + a degree-6 polynomial, 1-2 ulp) because
    LLVM does not vectorise calls to libm's expf; with it the n-loop of the scan
    and the channel loops of softplus and SiLU become SIMD. float64 (ground-truth
    mode) keeps math.exp / math.log1p.
  * Outputs of the prefill kernels are (b, l, d) in memory and returned as the
    (b, d, l) view the signature promises, so the matmul that follows reads them
    contiguously; inputs may be any strided views (the model passes transposed
    views of its matmul outputs, no copies).
  * Each core is compiled once per dtype with explicit 'A' (any layout) array types
    and cached on disk (cache=True), so contiguous and strided inputs share one
    compiled version and the first call in a new process loads, not compiles.

Every argument of the readable twins is accepted. Grouped B/C ((b, g, n, l), (b, g, n)) and
mamba_ssm's multi-head state layout run the same cores, one call per group of channels;
continuous-batching indices (state_batch_indices, conv_state_indices) gather the named
state rows, run the core, and write them back (ops.on_state_rows). Forms that are rare in
decoding fall back to minimamba.ops (same result, NumPy speed), each marked where it
happens: B/C of shape (d, n) (S4, input-independent), causal_conv1d_fn's seq_idx (packed
variable-length sequences) and causal_conv1d_update's cache_seqlens (a circular conv state).
"""

from __future__ import annotations

import math
import types as pytypes

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from minimamba import ops
from minimamba.ops import compute_dtype

BLOCK = 64  # channels per prange work item: the SIMD loops run over them (a fixed trip count)
PARALLEL_MIN = 1 << 16  # decode kernels go parallel from this many state numbers (b * d * n) up
FASTMATH = {"contract", "reassoc", "nsz", "arcp"}  # no 'nnan'/'ninf': NaN and inf still propagate


# ---------------------------------------------------------------- vectorisable exp / softplus / silu

@intrinsic
def _bits_to_float32(typingctx, bits):
    """Reinterpret an int32's bits as a float32 (what a C union does)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


_F32 = np.float32
_LOG2E = _F32(1.4426950408889634)
_LN2_HI = _F32(0.693359375)  # Cody-Waite split of ln 2: the high part is exact in 9 bits
_LN2_LO = _F32(-2.12194440e-4)
_EXP_HI = _F32(88.72283)  # exp overflows float32 above this
_EXP_LO = _F32(-87.33654)  # ... and leaves the normal range below this
_P0, _P1, _P2 = _F32(1.9875691500e-4), _F32(1.3981999507e-3), _F32(8.3334519073e-3)  # Cephes expf
_P3, _P4, _P5 = _F32(4.1665795894e-2), _F32(1.6666665459e-1), _F32(5.0000001201e-1)
_ONE, _HALF, _ZERO, _TWO, _INF = _F32(1.0), _F32(0.5), _F32(0.0), _F32(2.0), _F32(np.inf)


@njit(inline="always")
def _expf(x):
    """exp for float32 in straight-line code that LLVM vectorises (Cephes expf, ~1 ulp)."""
    xc = min(max(x, _EXP_LO), _EXP_HI)
    k = min(np.floor(xc * _LOG2E + _HALF), _F32(127.0))  # 2^128 is not a float32; r takes the rest
    r = xc - k * _LN2_HI - k * _LN2_LO  # |r| <= ln2 / 2
    p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
    p = p * r * r + r + _ONE
    scale = _bits_to_float32(np.int32((np.int32(k) + 127) << 23))  # 2^k from its exponent bits
    e = p * scale
    e = _ZERO if x < _EXP_LO else e  # underflow to 0 (the reference gives at most a subnormal)
    return _INF if x > _EXP_HI else (x if x != x else e)  # overflow, NaN in -> NaN out


def fast_exp(x):  # pragma: no cover - replaced by the overload inside jitted code
    return math.exp(x)


@overload(fast_exp, inline="always")
def _fast_exp_overload(x):
    if x == types.float32:
        return lambda x: _expf(x)
    return lambda x: math.exp(x)


@njit(inline="always")
def _log1p_unit_f32(w):
    """log(1 + w) for w in [0, 1] (float32): 2 atanh(s), s = w / (2 + w) <= 1/3, as a series."""
    s = w / (_TWO + w)
    s2 = s * s
    q = _F32(1 / 17)
    q = q * s2 + _F32(1 / 15)
    q = q * s2 + _F32(1 / 13)
    q = q * s2 + _F32(1 / 11)
    q = q * s2 + _F32(1 / 9)
    q = q * s2 + _F32(1 / 7)
    q = q * s2 + _F32(1 / 5)
    q = q * s2 + _F32(1 / 3)
    q = q * s2 + _ONE
    return _TWO * s * q


def softplus(x):  # pragma: no cover - replaced by the overload inside jitted code
    return x if x > 20.0 else math.log1p(math.exp(x))


@overload(softplus, inline="always")
def _softplus_overload(x):
    if x == types.float32:
        def f32(x):
            # max(x, 0) + log1p(exp(-|x|)): no overflow, vectorisable; for x > 20 the
            # second term is below half an ulp of x, so this is x as the reference has it.
            ax = abs(x)
            return max(x, _ZERO) + _log1p_unit_f32(_expf(-ax))
        return f32

    def f64(x):  # the reference's threshold-20 form, exactly
        return x if x > 20.0 else math.log1p(math.exp(x))
    return f64


def silu(x):  # pragma: no cover - replaced by the overload inside jitted code
    return x / (1.0 + math.exp(-x))


@overload(silu, inline="always")
def _silu_overload(x):
    if x == types.float32:
        return lambda x: x / (_ONE + _expf(-x))
    return lambda x: x / (1.0 + math.exp(-x))


# ---------------------------------------------------------------- jitted cores


def _scan_core(u, delta, A, B, C, D, z, delta_bias, h0, out, last_state,
               has_D, has_z, has_bias, has_h0, delta_softplus):
    """u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l); h0, last_state: (b, d, n); out: (b, d, l).

    Per work item, a block of BLOCK channels: its state is held transposed, (n, BLOCK),
    so every inner loop runs over BLOCK contiguous channels (a fixed trip count LLVM
    turns into SIMD); inputs are gathered into small contiguous buffers once per step.
    """
    b, d, l = u.shape
    n = A.shape[1]
    nblocks = (d + BLOCK - 1) // BLOCK
    for job in prange(b * nblocks):
        bi = job // nblocks
        c0 = (job % nblocks) * BLOCK
        w = min(BLOCK, d - c0)
        h = np.zeros((n, BLOCK), dtype=out.dtype)  # the state of this block of channels, (n, BLOCK)
        At = np.zeros((n, BLOCK), dtype=out.dtype)  # A transposed
        dt = np.zeros(BLOCK, dtype=out.dtype)
        xt = np.zeros(BLOCK, dtype=out.dtype)
        dtx = np.zeros(BLOCK, dtype=out.dtype)
        zt = np.zeros(BLOCK, dtype=out.dtype)
        y = np.zeros(BLOCK, dtype=out.dtype)
        Dt = np.zeros(BLOCK, dtype=out.dtype)
        bias = np.zeros(BLOCK, dtype=out.dtype)
        for c in range(w):
            if has_D:
                Dt[c] = D[c0 + c]
            if has_bias:
                bias[c] = delta_bias[c0 + c]
            for i in range(n):
                At[i, c] = A[c0 + c, i]
                if has_h0:
                    h[i, c] = h0[bi, c0 + c, i]
        for t in range(l):
            for c in range(w):  # gather this step's inputs
                dt[c] = delta[bi, c0 + c, t]
                xt[c] = u[bi, c0 + c, t]
                if has_z:
                    zt[c] = z[bi, c0 + c, t]
            for c in range(BLOCK):  # Delta_t = softplus(delta + bias)
                v = dt[c] + bias[c]
                dt[c] = softplus(v) if delta_softplus else v
                dtx[c] = dt[c] * xt[c]
                y[c] = Dt[c] * xt[c]  # D skip
            for i in range(n):  # h = exp(Delta A) h + Delta B x;  y += C . h
                Bi = B[bi, i, t]
                Ci = C[bi, i, t]
                for c in range(BLOCK):
                    hv = fast_exp(dt[c] * At[i, c]) * h[i, c] + dtx[c] * Bi
                    h[i, c] = hv
                    y[c] += hv * Ci
            if has_z:
                for c in range(BLOCK):
                    y[c] *= silu(zt[c])
            for c in range(w):
                out[bi, c0 + c, t] = y[c]
        for c in range(w):
            for i in range(n):
                last_state[bi, c0 + c, i] = h[i, c]


def _state_update_core(state, x, dt, A, B, C, D, z, dt_bias, out, has_D, has_z, has_bias, dt_softplus):
    """state: (b, d, n) in place; x, dt, z, out: (b, d); A: (d, n); B, C: (b, n).

    Blocks of BLOCK channels, the state copied to a transposed (n, BLOCK) buffer so
    the arithmetic runs over contiguous channels, as in the scan.
    """
    b, d, n = state.shape
    nblocks = (d + BLOCK - 1) // BLOCK
    for job in prange(b * nblocks):
        bi = job // nblocks
        c0 = (job % nblocks) * BLOCK
        w = min(BLOCK, d - c0)
        h = np.zeros((n, BLOCK), dtype=out.dtype)
        At = np.zeros((n, BLOCK), dtype=out.dtype)
        v = np.zeros(BLOCK, dtype=out.dtype)
        xt = np.zeros(BLOCK, dtype=out.dtype)
        dtx = np.zeros(BLOCK, dtype=out.dtype)
        y = np.zeros(BLOCK, dtype=out.dtype)
        zt = np.zeros(BLOCK, dtype=out.dtype)
        for c in range(w):
            v[c] = dt[bi, c0 + c] + (dt_bias[c0 + c] if has_bias else 0)
            xt[c] = x[bi, c0 + c]
            y[c] = D[c0 + c] * xt[c] if has_D else 0
            if has_z:
                zt[c] = z[bi, c0 + c]
            for i in range(n):
                h[i, c] = state[bi, c0 + c, i]
                At[i, c] = A[c0 + c, i]
        for c in range(BLOCK):
            if dt_softplus:
                v[c] = softplus(v[c])
            dtx[c] = v[c] * xt[c]
        for i in range(n):
            Bi = B[bi, i]
            Ci = C[bi, i]
            for c in range(BLOCK):
                hv = fast_exp(v[c] * At[i, c]) * h[i, c] + dtx[c] * Bi
                h[i, c] = hv
                y[c] += hv * Ci
        if has_z:
            for c in range(BLOCK):
                y[c] *= silu(zt[c])
        for c in range(w):
            out[bi, c0 + c] = y[c]
            for i in range(n):
                state[bi, c0 + c, i] = h[i, c]


def _conv_core(x, weight, bias, state, out, has_bias, has_state, use_silu):
    """x, out: (b, d, l); weight: (d, k). out[t] = sum_j weight[:, j] x[t - (k-1) + j] (+ bias, SiLU).

    Without a state the inputs before t = 0 are zeros (causal_conv1d_fn). With one,
    state (b, d, s), s >= k - 1, holds the inputs seen before: its last k - 1 stand
    in for the zeros, and it is shifted left by l in place (causal_conv1d_update).
    Blocks of BLOCK channels; the last k inputs of the block sit in a small rolling
    window, so each input is read once and every inner loop runs over channels.
    """
    b, d, l = x.shape
    k = weight.shape[1]
    s = state.shape[2]
    nblocks = (d + BLOCK - 1) // BLOCK
    for job in prange(b * nblocks):
        bi = job // nblocks
        c0 = (job % nblocks) * BLOCK
        w = min(BLOCK, d - c0)
        wt = np.zeros((k, BLOCK), dtype=out.dtype)  # taps, transposed
        window = np.zeros((k, BLOCK), dtype=out.dtype)  # window[j] = x[t - (k-1) + j]; zeros = the padding
        acc = np.zeros(BLOCK, dtype=out.dtype)
        b0 = np.zeros(BLOCK, dtype=out.dtype)
        for c in range(w):
            if has_bias:
                b0[c] = bias[c0 + c]
            for j in range(k):
                wt[j, c] = weight[c0 + c, j]
            if has_state:
                for j in range(k - 1):
                    window[j + 1, c] = state[bi, c0 + c, s - (k - 1) + j]
        for t in range(l):
            for j in range(k - 1):
                for c in range(BLOCK):
                    window[j, c] = window[j + 1, c]
            for c in range(w):
                window[k - 1, c] = x[bi, c0 + c, t]
            for c in range(BLOCK):
                acc[c] = b0[c]
            for j in range(k):
                for c in range(BLOCK):
                    acc[c] += wt[j, c] * window[j, c]
            if use_silu:
                for c in range(BLOCK):
                    acc[c] = silu(acc[c])
            for c in range(w):
                out[bi, c0 + c, t] = acc[c]
        if has_state:
            for q in range(s):  # state = the last s of [state, x]: reads run ahead of writes
                p = l + q
                for c in range(w):
                    state[bi, c0 + c, q] = state[bi, c0 + c, p] if p < s else x[bi, c0 + c, p - s]


def _rms_norm_core(x, weight, eps, out):
    """x, out: (rows, d); weight: (d,). out = x / sqrt(mean(x^2) + eps) * weight, one pass per row."""
    rows, d = x.shape
    for r in prange(rows):
        ss = x.dtype.type(0)
        for j in range(d):
            ss += x[r, j] * x[r, j]
        inv = 1 / math.sqrt(ss / d + eps)
        for j in range(d):
            out[r, j] = x[r, j] * inv * weight[j]


_jit_par = dict(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
_jit_ser = dict(cache=True, nogil=True, fastmath=FASTMATH)


def _serial(core):
    """A serial twin of `core` under its own name.

    Numba's disk cache files a compiled function under its qualified name and
    signature, not its flags: compiled from one Python function, the parallel and
    the serial version would overwrite each other on disk, and a later process
    would load whichever came last for both.
    """
    twin = pytypes.FunctionType(core.__code__, core.__globals__, core.__name__ + "_serial")
    twin.__qualname__ = core.__qualname__ + "_serial"
    return njit(**_jit_ser)(twin)


_CORES = {
    "scan": njit(**_jit_par)(_scan_core),
    "state_update": _serial(_state_update_core),
    "state_update_par": njit(**_jit_par)(_state_update_core),
    "conv": _serial(_conv_core),
    "conv_par": njit(**_jit_par)(_conv_core),
    "rms_norm": _serial(_rms_norm_core),
    "rms_norm_par": njit(**_jit_par)(_rms_norm_core),
}
_ARGS = {  # array ranks (0: a scalar), the number of boolean flags, the array layout
    "scan": ((3, 3, 2, 3, 3, 1, 3, 1, 3, 3, 3), 5, "A"),
    "state_update": ((3, 2, 2, 2, 2, 2, 1, 2, 1, 2), 4, "A"),
    "conv": ((3, 2, 1, 3, 3), 3, "A"),
    "rms_norm": ((2, 1, 0, 2), 0, "C"),  # contiguous rows: the row loops become SIMD
}
_compiled = {}


def _core(name, dtype):
    """The entry point of core `name` for `dtype`, compiled (or loaded from the disk cache) once.

    Explicit signatures, mostly with layout 'A' arrays: one compiled version serves
    contiguous and strided inputs alike, and calls skip the dispatcher's type search.
    """
    key = (name, dtype)
    if key not in _compiled:
        ranks, nflags, layout = _ARGS[name.replace("_par", "")]
        nbt = numba.from_dtype(dtype)
        sig = tuple(nbt if r == 0 else types.Array(nbt, r, layout) for r in ranks) + (types.boolean,) * nflags
        _compiled[key] = _CORES[name].compile(sig)
    return _compiled[key]


def _as(a, ct):
    return a.astype(ct, copy=False)


def _dummy(ndim, ct):
    return np.zeros((0,) * ndim, dtype=ct)


def _numpy_only(*arrays):
    for a in arrays:
        if a is not None and not isinstance(a, np.ndarray):
            raise TypeError(f"minimamba.kernels.cpu works on NumPy arrays, got {type(a).__module__}."
                            f"{type(a).__name__}; use impl='cuda' (or 'numpy') for CuPy arrays")


def _empty_bld(b, d, l, ct):
    """A (b, d, l) array whose memory is laid out (b, l, d): what the next matmul wants."""
    return np.empty((b, l, d), dtype=ct).transpose(0, 2, 1)


# ---------------------------------------------------------------- the four kernels


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                      delta_softplus=False, return_last_state=False, initial_state=None):
    """Fused selective scan; see `minimamba.ops.selective_scan_ref` for the arguments and maths."""
    _numpy_only(u, delta, A, B, C, D, z, delta_bias, initial_state)
    b, d, l, n = ops.check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if B.ndim == 2 or C.ndim == 2 or _mixed_groups(B, C, 4):
        # (d, n) B/C (S4, input-independent; no Mamba checkpoint uses it): the readable path.
        return ops.selective_scan_fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                     delta_softplus=delta_softplus, return_last_state=return_last_state,
                                     initial_state=initial_state)
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    out = _empty_bld(b, d, l, ct)  # (b, d, l)
    last_state = np.empty((b, d, n), dtype=ct)  # (b, d, n)
    for c, Bg, Cg in _groups(d, B, C, 4, ct):  # one core call per group of channels sharing B and C
        _core("scan", ct)(
            _as(_cut(u, c), ct), _as(_cut(delta, c), ct), _as(_cut(A, c, 0), ct), Bg, Cg,
            _dummy(1, ct) if D is None else _as(_cut(D, c, 0), ct), _dummy(3, ct) if z is None else _as(_cut(z, c), ct),
            _dummy(1, ct) if delta_bias is None else _as(_cut(delta_bias, c, 0), ct),
            _dummy(3, ct) if initial_state is None else _as(_cut(initial_state, c), ct), _cut(out, c),
            _cut(last_state, c), D is not None, z is not None, delta_bias is not None, initial_state is not None,
            bool(delta_softplus))
    out = out.astype(u.dtype, copy=False)
    return (out, last_state) if return_last_state else out


def _mixed_groups(B, C, ndim):
    """True when B and C are grouped by counts neither of which divides the other (the readable path)."""
    gb = B.shape[1] if B.ndim == ndim else 1
    gc = C.shape[1] if C.ndim == ndim else 1
    return max(gb, gc) % min(gb, gc) != 0


def _groups(d, B, C, ndim, ct):
    """(channels, B, C) for each group of channels that shares B and C.

    channels is None (all of them, no slicing: the Mamba-1 decode path stays as lean as it
    was) when neither B nor C is grouped; else the slice of group j, with the B and C of
    that group: (b, n[, l]) arrays either way.
    """
    if B.ndim == ndim - 1 and C.ndim == ndim - 1:
        return [(None, _as(B, ct), _as(C, ct))]
    B, C = (_as(M, ct) if M.ndim == ndim else _as(M, ct)[:, None] for M in (B, C))  # (b, g, n[, l])
    g = max(B.shape[1], C.shape[1])
    step = d // g
    return [(slice(j * step, (j + 1) * step), B[:, j * B.shape[1] // g], C[:, j * C.shape[1] // g])
            for j in range(g)]


def _cut(a, channels, axis=1):
    """The given channels of `a` along `axis` (None: all of them, `a` itself)."""
    return a if channels is None else a[(slice(None),) * axis + (channels,)]


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """One decode step, `state` updated in place; see `minimamba.ops.selective_state_update`.

    Single-head (b, d, n) or mamba_ssm's multi-head (b, h, p, n) state (heads flattened
    into channels, ops.heads_as_channels); state_batch_indices gathers and writes back rows.
    """
    _numpy_only(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    if state.ndim == 4:
        return ops.on_heads_as_channels(selective_state_update, state, x, dt, A, B, C, D, z, dt_bias,
                                        dt_softplus=dt_softplus, state_batch_indices=state_batch_indices)
    b, d, n = ops.check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    if state_batch_indices is not None:
        return ops.on_state_rows(_state_update, state, state_batch_indices, x, dt, A, B, C, D, z, dt_bias,
                                 dt_softplus)
    return _state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def _state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    b, d, n = state.shape
    if state.dtype not in (np.float32, np.float64) or _mixed_groups(B, C, 3):
        # a float16 state, or B and C in group counts that do not nest: the readable path
        return ops.selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    ct = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    if state.dtype != ct:  # a float32 state in a float64 call: update a float64 copy, write it back
        work = state.astype(ct)
        out = _state_update(work, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
        state[...] = work
        return out
    out = np.empty((b, d), dtype=ct)
    name = "state_update_par" if b * d * n >= PARALLEL_MIN else "state_update"
    for c, Bg, Cg in _groups(d, B, C, 3, ct):  # one core call per group of channels sharing B and C
        _core(name, ct)(
            _cut(state, c), _as(_cut(x, c), ct), _as(_cut(dt, c), ct), _as(_cut(A, c, 0), ct), Bg, Cg,
            _dummy(1, ct) if D is None else _as(_cut(D, c, 0), ct), _dummy(2, ct) if z is None else _as(_cut(z, c), ct),
            _dummy(1, ct) if dt_bias is None else _as(_cut(dt_bias, c, 0), ct), _cut(out, c),
            D is not None, z is not None, dt_bias is not None, bool(dt_softplus))
    return out.astype(x.dtype, copy=False)


def _check_activation(activation):
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return activation is not None


def _conv(x, weight, bias, state, out, use_silu):
    """Run the conv core, in parallel when the work pays for the thread hand-off."""
    b, d, l = x.shape
    ct = out.dtype
    name = "conv_par" if b * d * (l + weight.shape[1]) >= PARALLEL_MIN else "conv"
    _core(name, ct)(x, _as(weight, ct), _dummy(1, ct) if bias is None else _as(bias, ct), state, out,
                    bias is not None, state.size > 0, use_silu)


def rms_norm(x, weight, eps=1e-5):
    """RMSNorm over the last axis in one pass per row; see `minimamba.ops.rms_norm`."""
    _numpy_only(x, weight)
    ops.check_norm_args(x, weight)
    ct = compute_dtype(x, weight)
    rows = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=ct)  # (rows, d)
    out = np.empty_like(rows)
    name = "rms_norm_par" if rows.size >= PARALLEL_MIN else "rms_norm"
    _core(name, ct)(rows, np.ascontiguousarray(weight, dtype=ct), ct.type(eps), out)
    return out.reshape(x.shape)


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """Causal depthwise conv (+ bias, SiLU); see `minimamba.ops.causal_conv1d_fn`.

    initial_states and the final states use the core's state: it starts the window and
    is shifted by l at the end, leaving the last k - 1 inputs, the final states.
    """
    _numpy_only(x, weight, bias, seq_idx, initial_states, final_states_out)
    b, d, l, k = ops.check_conv_args(x, weight, bias, seq_idx, initial_states, final_states_out)
    if seq_idx is not None:  # packed variable-length sequences (rare in inference): the readable path
        return ops.causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx, initial_states=initial_states,
                                    return_final_states=return_final_states, final_states_out=final_states_out,
                                    activation=activation)
    use_silu = _check_activation(activation)
    ct = compute_dtype(x, weight)
    if initial_states is not None:
        state = np.array(initial_states, dtype=ct)  # (b, d, k-1), a copy the core shifts
    else:
        state = np.zeros((b, d, k - 1) if return_final_states else (0, 0, 0), dtype=ct)
    out = _empty_bld(b, d, l, ct)  # (b, d, l)
    _conv(_as(x, ct), weight, bias, state, out, use_silu)
    out = out.astype(x.dtype, copy=False)
    if not return_final_states:
        return out
    return ops.with_final_states(out, state.astype(x.dtype, copy=False), final_states_out)  # (b, d, k-1)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """A few conv steps through `conv_state` (updated in place); see `minimamba.ops.causal_conv1d_update`."""
    _numpy_only(x, conv_state, weight, bias, cache_seqlens, conv_state_indices)
    single = x.ndim == 2
    x3 = x[:, :, None] if single else x  # (b, d, l)
    ops.check_conv_update_args(x3, conv_state, weight, bias, cache_seqlens, conv_state_indices)
    use_silu = _check_activation(activation)
    if cache_seqlens is not None:  # a circular conv state (rare; vLLM-style caches): the readable path
        return ops.causal_conv1d_update(x, conv_state, weight, bias, activation=activation,
                                        cache_seqlens=cache_seqlens, conv_state_indices=conv_state_indices)
    if conv_state_indices is not None:
        out = ops.on_state_rows(_conv_update, conv_state, conv_state_indices, x3, weight, bias, use_silu)
    else:
        out = _conv_update(conv_state, x3, weight, bias, use_silu)
    return out[:, :, 0] if single else out


def _conv_update(conv_state, x, weight, bias, use_silu):
    """causal_conv1d_update with x (b, d, l) and one conv_state row per batch row."""
    b, d, l = x.shape
    ct = compute_dtype(x, weight)
    if conv_state.dtype != ct:  # the state keeps its own dtype; work on a copy in the compute dtype
        work = conv_state.astype(ct)
        out = _conv_update(work, x, weight, bias, use_silu)
        conv_state[...] = work
        return out
    out = np.empty((b, d, l), dtype=ct) if l == 1 else _empty_bld(b, d, l, ct)
    _conv(_as(x, ct), weight, bias, conv_state, out, use_silu)
    return out.astype(x.dtype, copy=False)
