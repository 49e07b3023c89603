"""selective_scan_fn: every version, checked against `minimamba.ops.selective_scan_ref` and timed.

    python -m minimamba.kernels.lab.scan                       a GPU: check, then 1x1536x8192 and 16x1536x8192
    python -m minimamba.kernels.lab.scan --b 1 --l 8192 --sweep   ... and v3's layouts and chunk sizes
    NUMBA_ENABLE_CUDASIM=1 python -m minimamba.kernels.lab.scan   the simulator: the check, at tiny size

Versions (b batch, d channels, l length, n state; figures in kernels/lab/README.md):

    1 v1       one thread per (b, channel) walks l, its n states in registers  [library: short prompts]
    2 chunked  three launches over (b, chunk, channel): chunk end states from 0, carry, rerun  [library: long]
    3 v3       chunked re-blocked: B, C, delta, u staged in shared memory per block of channels, the n states
               of a channel split over threads, exp(dt A) as one exp2; pass 1 skips the last chunk

Versions 1 and 2 are the library's (kernels/cuda.py); 3 lives here until a GPU run shows it faster.
Each time is the GPU work alone (launches queued behind busy work); GB/s counts the bytes a scan must
move (u, delta, z, out; B, C; the states), beside the card's measured copy bandwidth.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import NamedTuple

import numba
import numpy as np
from numba import cuda

from minimamba import ops
from minimamba.kernels import cuda as kc
from minimamba.kernels.cuda import _arg, _constants, _device, _dummy, _jit, _launch, _stream
from minimamba.kernels.lab import common
from minimamba.kernels.lab.common import SIMULATOR, compare, copy_bandwidth, kernel_time, say, to_device, to_host, xp


# ---------------------------------------------------------------- version 3: v3


class V3Layout(NamedTuple):
    """The compile-time shape of a scan_v3 block."""

    lanes: int  # channel lanes per block
    split: int  # threads per channel lane: the n states are split over them, ceil(n / split) each
    channels: int  # channels per thread (lane, lane + lanes, ...): B and C read once from shared for all of them
    steps: int  # steps of l staged in shared memory at a time


V3_LAYOUT = V3Layout(lanes=32, split=2, channels=2, steps=16)  # 64 threads, 64 channels a block; picked on
# static SASS counts (see the README) until a GPU run's side-by-side timing of V3_CANDIDATES settles it
V3_TARGET_THREADS = 132 * 1024  # v3: aim for about this many threads (half an H200's resident threads) ...
V3_MIN_CHUNK = 64  # ... in chunks of l no shorter than this (rounded up to whole tiles of `steps`)
V3_SHARED_LIMIT = 48 * 1024  # bytes of static shared memory a block may have (v3 halves `steps` to fit)
V3_CANDIDATES = (V3Layout(32, 4, 2, 16), V3Layout(32, 2, 2, 16), V3Layout(128, 1, 1, 16), V3Layout(64, 1, 2, 16))
# (the layouts `--sweep` times side by side; tests/gpu compiles each of them)



def _pow2_function(dtype):
    """2 ** x: math.exp2 (one ex2.approx in float32 fastmath, no scaling multiply) where Python has it (3.11+)."""
    if hasattr(math, "exp2"):
        def pow2(x):
            return math.exp2(x)
    else:  # pragma: no cover - Python 3.10
        LN2 = np.dtype(dtype).type(math.log(2.0))

        def pow2(x):
            return math.exp(x * LN2)
    return pow2


def _scan_v3_functions(n, dtype, layout):
    """scan_v3_state and scan_v3_output for state size n and one V3Layout (chunk_carry is shared with chunked)."""
    N = n
    CL, S, KC, T = layout.lanes, layout.split, layout.channels, layout.steps
    NS = -(-N // S)  # states per thread
    NP = NS * S  # states padded to a whole number per thread (the pads stay 0: their A, B and C are 0)
    CH = CL * KC  # channels per block
    R = KC * NS  # state values per thread: h[m * NS + k] is channel lane + m * CL, state k * S + s
    SP = S + 1 if S > 1 else 1  # sy's last axis, padded so the summing reads do not share a memory bank
    ZERO, ONE, THRESHOLD = _constants(dtype)
    LOG2E = np.dtype(dtype).type(1.0 / math.log(2.0))
    ht = numba.from_dtype(np.dtype(dtype))

    def stage_tile(u, delta, delta_bias, B, C, sdt, sx, sB, sC, bi, c0, cmax, gb, gc, t, nt, has_bias, softplus,
                   with_c):
        """Steps t..t+nt-1 into shared memory: delta (+ bias, softplus) and u of the block's channels, and
        B (and C when with_c) of its group, read once and used by every channel of the block."""
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        for q in range(tid, nt * CH, nthreads):  # channels fastest: coalesced in the (b, l, d) layout
            tt = q // CH
            cc = q - tt * CH
            dt = ZERO
            x = ZERO
            if cc < cmax:  # a channel past the block's end scans zeros (its A is 0 too)
                ch = c0 + cc
                dt = delta[bi, ch, t + tt] + (delta_bias[ch] if has_bias else ZERO)
                if softplus and dt <= THRESHOLD:
                    dt = math.log1p(math.exp(dt))
                x = u[bi, ch, t + tt]
            sdt[tt, cc] = dt
            sx[tt, cc] = x
        for q in range(tid, nt * NP, nthreads):
            tt = q // NP
            i = q - tt * NP
            sB[tt, i] = B[bi, gb, i, t + tt] if i < N else ZERO
            if with_c:
                sC[tt, i] = C[bi, gc, i, t + tt] if i < N else ZERO

    def block_place(d, l, seg, nchunks, chunk_len):
        """This thread's (thread, channel lane, state slot) and its block's (batch row, chunk, first channel,
        channels in the block, first and end step); blocks never straddle a group of B or C."""
        tid = cuda.threadIdx.x
        lane = tid // S
        nsub = (seg + CH - 1) // CH
        block = cuda.blockIdx.x
        sb = block % nsub
        rest = block // nsub
        nseg = d // seg
        si = rest % nseg
        rest = rest // nseg
        j = rest % nchunks
        t0 = j * chunk_len
        return (tid, lane, tid - lane * S, rest // nchunks, j, si * seg + sb * CH, min(CH, seg - sb * CH),
                t0, min(t0 + chunk_len, l))

    def store_states(h, dst, c0, cmax, lane, s):
        """This thread's states into dst[i, c] (an (n, d) view), skipping the pads."""
        for m in range(KC):
            cc = lane + m * CL
            if cc < cmax:
                for k in range(NS):
                    i = k * S + s
                    if i < N:
                        dst[i, c0 + cc] = h[m * NS + k]

    stage = _device(stage_tile, dtype)
    store = _device(store_states, dtype)
    pow2 = _device(_pow2_function(dtype), dtype)
    place = _device(block_place, dtype)

    def scan_v3_state(u, delta, A, B, delta_bias, chunk_h, chunk_dt, chunk_len, seg, has_bias, softplus):
        # Pass 1: each chunk but the last, from h = 0: its end state and its summed delta.
        nb, d, l = u.shape
        tid, lane, s, bi, j, c0, cmax, t0, t1 = place(d, l, seg, chunk_h.shape[1] - 1, chunk_len)
        gb = c0 // (d // B.shape[1])
        sdt = cuda.shared.array((T, CH), ht)
        sx = cuda.shared.array((T, CH), ht)
        sB = cuda.shared.array((T, NP), ht)
        h = cuda.local.array(R, ht)
        a = cuda.local.array(R, ht)
        total = cuda.local.array(KC, ht)
        for m in range(KC):
            cc = lane + m * CL
            total[m] = ZERO
            for k in range(NS):
                i = k * S + s
                h[m * NS + k] = ZERO
                a[m * NS + k] = A[c0 + cc, i] * LOG2E if (cc < cmax and i < N) else ZERO  # exp(x) = 2^(x log2 e)
        for t in range(t0, t1, T):
            nt = min(T, t1 - t)
            stage(u, delta, delta_bias, B, B, sdt, sx, sB, sB, bi, c0, cmax, gb, gb, t, nt, has_bias, softplus, 0)
            cuda.syncthreads()
            for tt in range(nt):
                rdt, rx, rB = sdt[tt, lane:], sx[tt, lane:], sB[tt, s:]  # constant offsets from here on
                for m in range(KC):
                    dt = rdt[m * CL]
                    dtx = dt * rx[m * CL]
                    total[m] += dt
                    for k in range(NS):
                        h[m * NS + k] = pow2(dt * a[m * NS + k]) * h[m * NS + k] + dtx * rB[k * S]
            cuda.syncthreads()  # before the next tile overwrites the shared arrays
        store(h, chunk_h[bi, j], c0, cmax, lane, s)
        for m in range(KC):
            if s == 0 and lane + m * CL < cmax:
                chunk_dt[bi, j, c0 + lane + m * CL] = total[m]

    def scan_v3_output(u, delta, A, B, C, D, z, delta_bias, initial_state, chunk_h, out, last_state, chunk_len, seg,
                       has_D, has_z, has_bias, softplus, has_init, use_chunks):
        # Pass 3: every chunk from the state entering it (chunk_h after chunk_carry, or initial_state when the
        # scan is one chunk), writing y = C h + D x, gated by silu(z), and the last chunk's final state.
        nb, d, l = u.shape
        nchunks = (l + chunk_len - 1) // chunk_len
        tid, lane, s, bi, j, c0, cmax, t0, t1 = place(d, l, seg, nchunks, chunk_len)
        nthreads = cuda.blockDim.x
        gb = c0 // (d // B.shape[1])
        gc = c0 // (d // C.shape[1])
        sdt = cuda.shared.array((T, CH), ht)
        sx = cuda.shared.array((T, CH), ht)
        sB = cuda.shared.array((T, NP), ht)
        sC = cuda.shared.array((T, NP), ht)
        sy = cuda.shared.array((T, CH, SP), ht)  # per (step, channel): the partial sums of C h of its S threads
        h = cuda.local.array(R, ht)
        a = cuda.local.array(R, ht)
        for m in range(KC):
            cc = lane + m * CL
            for k in range(NS):
                i = k * S + s
                h[m * NS + k] = ZERO
                a[m * NS + k] = ZERO
                if cc < cmax and i < N:
                    a[m * NS + k] = A[c0 + cc, i] * LOG2E
                    if use_chunks:
                        h[m * NS + k] = chunk_h[bi, j, i, c0 + cc]
                    elif has_init:
                        h[m * NS + k] = initial_state[bi, c0 + cc, i]
        for t in range(t0, t1, T):
            nt = min(T, t1 - t)
            stage(u, delta, delta_bias, B, C, sdt, sx, sB, sC, bi, c0, cmax, gb, gc, t, nt, has_bias, softplus, 1)
            cuda.syncthreads()
            for tt in range(nt):
                # rows of this step seen from this thread: constant offsets from here on (immediate addresses)
                rdt, rx, rB, rC = sdt[tt, lane:], sx[tt, lane:], sB[tt, s:], sC[tt, s:]
                for m in range(KC):
                    dt = rdt[m * CL]
                    dtx = dt * rx[m * CL]
                    y = ZERO
                    for k in range(NS):
                        hk = pow2(dt * a[m * NS + k]) * h[m * NS + k] + dtx * rB[k * S]  # exp(dt A) h + dt B x
                        h[m * NS + k] = hk
                        y += hk * rC[k * S]  # this thread's share of C_t . h_t
                    sy[tt, lane + m * CL, s] = y
            cuda.syncthreads()
            for q in range(tid, nt * CH, nthreads):  # one thread per (step, channel), channels fastest: coalesced
                tt = q // CH
                cc = q - tt * CH
                if cc < cmax:
                    y = ZERO
                    for p in range(S):
                        y += sy[tt, cc, p]
                    if has_D:
                        y += D[c0 + cc] * sx[tt, cc]
                    if has_z:
                        g = z[bi, c0 + cc, t + tt]
                        y = y * g / (ONE + math.exp(-g))  # y * silu(z)
                    out[bi, c0 + cc, t + tt] = y
            cuda.syncthreads()
        if j == nchunks - 1:
            store(h, last_state[bi].T, c0, cmax, lane, s)

    return dict(scan_v3_state=scan_v3_state, scan_v3_output=scan_v3_output)


@functools.lru_cache(maxsize=None)
def _v3_kernel(name, n, dtype_name, layout):
    return _jit(_scan_v3_functions(n, np.dtype(dtype_name), layout)[name], dtype_name)


def _v3_fit(layout, n, ct):
    """The layout with its steps halved until a block's shared arrays fit in V3_SHARED_LIMIT bytes."""
    channels = layout.lanes * layout.channels
    padded = -(-n // layout.split) * layout.split
    per_step = ct.itemsize * (2 * channels + 2 * padded + channels * (layout.split + (layout.split > 1)))
    steps = layout.steps
    while steps > 1 and steps * per_step > V3_SHARED_LIMIT:
        steps //= 2
    if steps * per_step > V3_SHARED_LIMIT:
        raise ValueError(f"V3_LAYOUT {tuple(layout)} needs {per_step} bytes of shared memory a block even at one "
                         f"step (n = {n}, {ct.name}); the limit is {V3_SHARED_LIMIT}: fewer channels a block")
    return layout._replace(steps=steps)


def scan_v3(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
            initial_state=None, chunk_size=None, layout=None):
    """Version 3; arguments and result as kernels.cuda.selective_scan_fn (`layout`: a V3Layout, None: V3_LAYOUT)."""
    s = kc.scan_arguments("scan_v3", u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
    if s.l == 0:  # the state passes through
        s.last_state[...] = 0 if initial_state is None else initial_state
    else:
        _scan_v3(s, chunk_size, layout or V3_LAYOUT)
    return kc.scan_result(s, u.dtype, return_last_state)


def _scan_v3(s, chunk_size, layout):
    """The v3 launches: scan_v3_state and chunk_carry when there is more than one chunk, then scan_v3_output."""
    b, d, l, n, ct = s.b, s.d, s.l, s.n, s.ct
    layout = _v3_fit(layout, n, ct)
    channels = layout.lanes * layout.channels  # per block
    threads = layout.lanes * layout.split  # per block
    seg = math.gcd(d // s.B4.shape[1], d // s.C4.shape[1])  # a block's channels share one group of B and one of C
    blocks = (d // seg) * -(-seg // channels)  # per (batch row, chunk)
    if chunk_size is None:
        nchunks = max(1, min(round(V3_TARGET_THREADS / (b * blocks * threads)), -(-l // V3_MIN_CHUNK)))
        chunk_size = -(-l // nchunks)
        chunk_size = -(-chunk_size // layout.steps) * layout.steps  # whole tiles
    chunk_size = kc.positive_chunk_size(chunk_size)
    nchunks = -(-l // chunk_size)
    a_u, a_delta, a_A, a_B = _arg(s.u), _arg(s.delta), _arg(s.A), _arg(s.B4)
    stream = _stream()
    if nchunks > 1:
        chunk_h = s.xp.empty((b, nchunks, n, d), dtype=ct)  # end states from 0, then states entering each chunk
        chunk_dt = s.xp.empty((b, nchunks, d), dtype=ct)  # sum of delta over each chunk
        chunk_h[:, -1] = 0  # the last chunk's end is never needed: zeros keep chunk_carry's last step harmless
        chunk_dt[:, -1] = 0
        a_h = _arg(chunk_h)
        a_dt = _arg(chunk_dt)
        _v3_kernel("scan_v3_state", n, ct.name, layout)[b * (nchunks - 1) * blocks, threads, stream](
            a_u, a_delta, a_A, a_B, s.bias, a_h, a_dt, chunk_size, seg, s.has_bias, s.softplus)
        _launch("chunk_carry", n, ct, b * n * d, a_A, s.init, a_h, a_dt, s.has_init)
    else:
        a_h = _dummy(s.xp, ct, 4)
    _v3_kernel("scan_v3_output", n, ct.name, layout)[b * nchunks * blocks, threads, stream](
        a_u, a_delta, a_A, a_B, _arg(s.C4), s.D, s.z, s.bias, s.init, a_h, _arg(s.out), _arg(s.last_state),
        chunk_size, seg, s.has_D, s.has_z, s.has_bias, s.softplus, s.has_init, int(nchunks > 1))


def kernel_signatures(dtype):
    """Explicit numba signatures of this file's kernels (for the compile_ptx test)."""
    v, i, a1, a2, a3, a4 = kc.signature_types(dtype)
    return dict(scan_v3_state=v(a3, a3, a2, a4, a1, a4, a3, i, i, i, i),
                scan_v3_output=v(a3, a3, a2, a4, a4, a1, a3, a1, a3, a4, a3, a3, i, i, i, i, i, i, i, i))


def kernel_functions(n, dtype, layout=None):
    """The Python functions of this file's kernels for state size n, one dtype and one layout (V3_LAYOUT)."""
    return _scan_v3_functions(n, dtype, layout or V3_LAYOUT)


# ---------------------------------------------------------------- the versions, the check, the timer


VERSIONS = [  # (number, name, idea, function with selective_scan_fn's arguments and chunk_size)
    (1, "v1", "one thread per (b, channel) walks l, states in registers  [library, short prompts]",
     functools.partial(kc.selective_scan_fn, version="v1")),
    (2, "chunked", "three launches over (b, chunk, channel): end states, carry, rerun  [library, long prompts]",
     functools.partial(kc.selective_scan_fn, version="chunked")),
    (3, "v3", "chunked re-blocked: B, C staged in shared memory, states split over threads, exp2",
     scan_v3),
]
CHECK_SHAPE = dict(b=2, d=21, l=13, n=3)  # tests/gpu's shape: the last block of threads and the last chunk partial
CHECK_TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}  # as tests/gpu/test_cuda_kernels.py: float32
# rounding grown over 13 steps of the recurrence, with a margin for the GPU's ex2.approx; float64 to its rounding


def inputs(b, d, l, n, dtype=np.float32, seed=0):
    """Random scan arguments on the host, u, delta and z in the model's (b, l, d) memory layout."""
    rng = np.random.default_rng(seed)

    def channels_last(*shape):  # (b, x, l) views of (b, l, x) arrays, as the model hands them over
        return rng.standard_normal((shape[0], shape[2], shape[1])).astype(dtype).transpose(0, 2, 1)

    return dict(u=channels_last(b, d, l), delta=channels_last(b, d, l) - 1, z=channels_last(b, d, l),
                B=channels_last(b, n, l), C=channels_last(b, n, l),
                A=-np.exp(rng.standard_normal((d, n))).astype(dtype), D=rng.standard_normal(d).astype(dtype),
                delta_bias=(0.5 * rng.standard_normal(d)).astype(dtype),
                initial_state=rng.standard_normal((b, d, n)).astype(dtype))


def check(versions=VERSIONS, dtypes=(np.float32, np.float64), chunk_size=5, layout=None, **shape):
    """Every version against ops.selective_scan_ref in float64, at CHECK_SHAPE; returns {name: max rel err}."""
    shape = {**CHECK_SHAPE, **shape}
    errors = {}
    for dtype in dtypes:
        args = inputs(**shape, dtype=dtype)
        ref, ref_last = ops.selective_scan_ref(**{k: a.astype(np.float64) for k, a in args.items()},
                                               delta_softplus=True, return_last_state=True)
        say(f"check at b={shape['b']} d={shape['d']} l={shape['l']} n={shape['n']}, {np.dtype(dtype).name}, "
            f"chunks of {chunk_size}, against ops.selective_scan_ref in float64:")
        for number, name, _, func in versions:
            extra = dict(layout=layout) if (layout is not None and func is scan_v3) else {}
            out, last = func(**{k: to_device(a) for k, a in args.items()}, delta_softplus=True,
                             return_last_state=True, chunk_size=chunk_size, **extra)
            tol = CHECK_TOL[np.dtype(dtype)]
            ok_out, err_out = compare(f"{number} {name} out", to_host(out), ref, tol)
            ok_last, err_last = compare(f"{number} {name} last state", to_host(last), ref_last, tol)
            errors[f"{name} {np.dtype(dtype).name}"] = max(err_out, err_last) if ok_out and ok_last else float("inf")
    return errors


def nbytes(b, d, l, n, itemsize=4):
    """Bytes a scan must move at least: u, delta, z in and y out; B and C; the final state; A, D, the bias."""
    return itemsize * (4 * b * d * l + 2 * b * n * l + b * d * n + d * n + 2 * d)


def bench(b, l, d=1536, n=16, versions=VERSIONS, copy_bw=None, sweep=False, results=None):
    """Time each version at one shape (float32, the model's layouts), each checked against version 1 there.

    Returns (and adds to `results`) {"scan_{b}x{l}_{name}": (bytes/s, seconds)}, and with `sweep` the
    best v3 layout and chunk as "scan_{b}x{l}_v3best": (bytes/s, seconds, layout, chunk).
    """
    results = {} if results is None else results
    args = {k: to_device(a) for k, a in inputs(b, d, l, n).items()}
    moved = nbytes(b, d, l, n)
    reference = kc.selective_scan_fn(**args, delta_softplus=True, return_last_state=True, version="v1")

    def run(func, **kw):
        return func(**args, delta_softplus=True, return_last_state=True, **kw)

    def timed(label, func, **kw):
        seconds = kernel_time(lambda: run(func, **kw))
        bw = moved / seconds
        ceiling = f" = {bw / copy_bw:5.1%} of the measured copy" if copy_bw else ""
        # float32 over l steps in another summation order: ~1e-6..1e-5 relative; a wrong index gives ~1
        err = agreement(run(func, **kw), reference)
        if err > 1e-3:
            results.setdefault("scan_mismatch", []).append(f"{b}x{l} {label}: {err:.1e}")
        say(f"scan b={b:2d} l={l:5d} {label:34s}: {seconds * 1e6:9.1f} us, {bw / 1e9:6.0f} GB/s{ceiling}; "
            f"vs v1 {err:.1e}{' MISMATCH' if err > 1e-3 else ''}")
        return bw, seconds

    for number, name, _, func in versions:
        results[f"scan_{b}x{l}_{name}"] = timed(f"{number} {name}", func)
    if sweep and any(func is scan_v3 for *_, func in versions):
        best = None
        for layout in V3_CANDIDATES:
            for chunk in ((None, 64, 128, 256, 512, 1024) if b == 1 else (None, 512, 2048, 8192)):
                if chunk is not None and chunk >= 2 * l:
                    continue
                bw, seconds = timed(f"3 v3 {tuple(layout)} chunk {chunk or 'auto'}", scan_v3, layout=layout,
                                    chunk_size=chunk)
                if best is None or bw > best[0]:
                    best = (bw, seconds, tuple(layout), chunk)
        results[f"scan_{b}x{l}_v3best"] = best
        say(f"  best v3 at {b}x{l}: layout {best[2]}, chunk {best[3] or 'auto'}: {best[0] / 1e9:,.0f} GB/s")
    return results


def agreement(got, reference):
    """Max relative difference of (out, last state) from the reference pair, on the device."""
    module = xp()
    return max(float(module.abs(g - r).max()) / max(float(module.abs(r).max()), 1e-30)
               for g, r in zip(got, reference))


def main(argv=None):
    parser = common.parser("minimamba.kernels.lab.scan", __doc__)
    parser.add_argument("--b", type=int, help="batch rows to time (GPU default: 1 and 16)")
    parser.add_argument("--l", type=int, help="length to time (GPU default: 8192)")
    parser.add_argument("--d", type=int, default=1536)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--sweep", action="store_true", help="also time v3's V3_CANDIDATES layouts x chunk sizes")
    args = parser.parse_args(argv)
    versions = common.select(VERSIONS, args.versions)
    failed = common.failures(check(versions, layout=V3Layout(lanes=4, split=2, channels=2, steps=4)
                                   if SIMULATOR else None))  # the simulator: a small block (a Python thread each)
    if args.check_only:
        return common.verdict(failed)
    if SIMULATOR:  # time at a tiny shape: shows the timer runs, says nothing of speed
        shapes = [(args.b or 1, args.l or 40, min(args.d, 8), min(args.n, 4))]
    else:
        shapes = [(b, args.l or 8192, args.d, args.n) for b in ([args.b] if args.b else [1, 16])]
    copy_bw = None if SIMULATOR else copy_bandwidth()
    results = {}
    for b, l, d, n in shapes:
        bench(b, l, d, n, versions, copy_bw, sweep=args.sweep and not SIMULATOR, results=results)
    return common.verdict(failed + results.get("scan_mismatch", []))


if __name__ == "__main__":
    sys.exit(main())
