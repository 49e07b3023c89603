"""Numba CUDA kernels for Mamba's four hot functions, behind the signatures of `minimamba.ops`.

Each public function takes the arguments of its readable twin in `minimamba.ops`
and gives the same result; tests/gpu compares them (under the CUDA simulator on
any machine, on a real GPU when one is there).

Versions, and what each parallelises over (b batch, d channels, l length, n state),
with what the GPU check measured on one H200 (float32, d = 1536, n = 16). Which one
runs is chosen by module constants; a version not yet measured on a GPU is never the
default: `python -m minimamba.kernels.gpu_check` times each beside its predecessor and
prints which constant to flip.

    selective_scan_fn
      v1       scan_v1: one thread per (b, channel), looping over l with the n
               state values in registers; the paper's hardware-aware scan in its
               simplest form (Section 3.3.2: the state never touches HBM).
               Used for l <= 64 (prompt chunks, tests). 1x8192: 12.3 ms; 16x8192: 13.0 ms.
      chunked  three launches, for long prompts (SCAN_LONG = "chunked", the default):
               chunk_state   one thread per (b, chunk of l, channel): the chunk's
                             end state from zero and its summed delta;
               chunk_carry   one thread per (b, state, channel): walks the chunks
                             in order, h_in(j+1) = exp(A * sum delta_j) h_in(j) + end_j;
               chunk_output  one thread per (b, chunk, channel): reruns its chunk
                             from h_in, writes y and (last chunk) the final state.
               scan_v1 and chunk_output share their step loop (run_steps, an inlined
               device function). Costs a second pass of exp(delta A), but fills the GPU.
               1x8192: 0.47 ms (435 GB/s, 9% of 4.8 TB/s); 16x8192: 6.1 ms (11%).
               Both are far from the bandwidth: per step and state they issue two
               strided loads (B, C), an exp and ~7 integer ops of 4-D index arithmetic
               (SASS: ~20 instructions per state-step in chunk_output, ~14 in chunk_state).
      v3       NOT YET MEASURED ON A GPU (SCAN_LONG = "v3" to use it). The same three
               passes, re-blocked: one block per (b, chunk, group of channels) whose
               channels share one group of B and C (V3Layout: `lanes` x `split` threads,
               `channels` channels per thread). Each tile of `steps` steps is staged in
               shared memory once per block -- softplus(delta + bias) and u per channel,
               B and C per state -- so B and C are read from HBM once per block, not once
               per channel, and softplus once per (channel, step), not once per state.
               A thread holds `channels` x ceil(n / split) states in registers (the n
               states of a channel split over `split` threads; their shares of C h are
               summed through shared memory, then the D skip and the silu(z) gate are
               applied by one thread per (step, channel), writes coalesced over channels).
               exp(dt A) is one ex2 (A pre-scaled by log2 e; math.exp2). Pass 1 skips the
               last chunk (its end state is never needed); with one chunk (large b) passes
               1 and 2 are skipped. Chunks: about V3_TARGET_THREADS threads in all.
               Static estimate from SASS (ptxas/nvdisasm, sm_90, default layout 32x2x2x16):
               8.3 instructions per state-step in pass 3, 6.2 in pass 1 (chunked: ~20
               and ~14), no spills. The floor at b = 1 is the exp unit (16 ex2 per clock per
               SM): two exps per state-step over 1536 x 8192 x 16 is ~96 us, ~2.1 TB/s =
               44% of 4.8 TB/s, below the 50% target; reaching it needs fewer chunks
               (large b: one chunk, one exp per state-step) or part of the exps on the
               FMA pipe (a polynomial 2^x), not tried.
    selective_state_update   one thread per (b, channel), loop over n, state in place.
    causal_conv1d_fn         one thread per (b, position, channel).
    causal_conv1d_update     l == 1 (decode): one thread per (b, channel), output and
                             state shift fused; l > 1: conv_fwd reading the state as
                             left context, then conv_shift, one thread per (b, channel).
    linear                   x @ W.T for decode steps. Not an ops twin: it exists so the
                             decode step can be captured in a CUDA graph (CuPy refuses
                             cuBLAS during capture); see cuda_graph.py.
      v1       one block per output feature, threads over the input width, shared-memory
               tree sum; every thread re-reads x for all rows (up to 64) per weight element.
               LINEAR = "v1", the default. Measured in the CUDA-graph decode: batch 1
               705 tok/s, batch 64 4,656 tok/s (10,000 is the target).
      v2       NOT YET MEASURED ON A GPU (LINEAR = "v2" to use it for batches of
               LINEAR_V2_MIN_ROWS = 2 rows or more; batch 1 stays on v1 unless that is
               lowered to 1). Tiled: a block of 16 x 16 threads computes 64 features for
               all rows (16, 32 or 64, compiled per row tile), staging x and W in shared
               memory 32 inputs at a time; each thread holds a 4 x 4 (or 1 x 4, 2 x 4)
               tile of outputs, so each weight element is read once per launch. When the
               features alone give few blocks (x_proj: 80, out_proj: 768) the input width
               is split over blocks (LINEAR_V2_BLOCKS) and the partial sums added by CuPy.
               SASS: 2.9 instructions per multiply-add (v1 at 64 rows: 10, with a global
               load each).

Launch cost: numba-cuda 0.30 spends ~15 us per array argument per launch (145 us
for selective_state_update's ten), so eager decode is launch-bound; the CUDA
graph of kernels.cuda_graph removes it (batch 1: 49 -> 705 tokens/s on an H200).

Kernels use plain `cuda.jit`, local and shared arrays, syncthreads, inlined device
functions and the 1-D grid only (no warp shuffles), so they run under the simulator
and move to another CUDA Python front end by an import change. Kernels are built per (state size n, dtype) by a
factory so the loops over n have a compile-time trip count (unrolled, the state
stays in registers) and float literals carry the kernel's dtype.

Arrays: CuPy arrays pass zero-copy through __cuda_array_interface__; NumPy
arrays are refused (they would be copied to the GPU and back at every launch),
except under the simulator (NUMBA_ENABLE_CUDASIM=1), where NumPy is the device.
Kernels launch on CuPy's current stream, so they order with CuPy's own work and
are captured by CuPy stream capture (CUDA graphs).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

try:
    from numba import cuda
    import numba
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("minimamba.kernels.cuda needs numba-cuda: pip install 'numba-cuda>=0.30,<0.31' "
                      "(from the repository: pip install -e '.[gpu]', or '.[gpu-cuda13]' for CUDA 13)") from err

from minimamba.ops import (array_module, check_conv_args, check_conv_update_args, check_scan_args,
                           check_shape, check_state_update_args, compute_dtype)

# NOTE: numba-cuda 0.30.x registers an overload for np.row_stack, which NumPy 2.5 removed, so its
# first compile fails with AttributeError on NumPy >= 2.5. Restore the alias NumPy 2.0-2.4 had.
if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack


def _simulator_enabled() -> bool:
    for path in ("numba.cuda.core.config", "numba.core.config"):
        try:
            module = __import__(path, fromlist=["ENABLE_CUDASIM"])
        except ImportError:
            continue
        if hasattr(module, "ENABLE_CUDASIM"):
            return bool(module.ENABLE_CUDASIM)
    return cuda.jit.__module__.startswith("numba.cuda.simulator")


SIMULATOR = _simulator_enabled()
THREADS = 128  # threads per block of every 1-D launch (tests lower it to cross block edges)
V1_MIN_ROWS = 1 << 20  # selective_scan_fn picks v1 when b * d reaches this or l <= 64, else chunked
# (on an H200, chunked beat v1 3x even at b * d = 24576, l = 8192)
CHUNK_TARGET_THREADS = 4 * 132 * 256  # chunked: aim for about this many threads (4 waves of 256 on an H100/H200)
MIN_CHUNK = 16  # chunked: shortest chunk of l one thread walks
SCAN_LONG = "chunked"  # the scan for long prompts (l > 64): "chunked" (measured) or "v3" (not yet measured)


class V3Layout(NamedTuple):
    """The compile-time shape of a scan_v3 block."""

    lanes: int  # channel lanes per block
    split: int  # threads per channel lane: the n states are split over them, ceil(n / split) each
    channels: int  # channels per thread (lane, lane + lanes, ...): B and C read once from shared for all of them
    steps: int  # steps of l staged in shared memory at a time


V3_LAYOUT = V3Layout(lanes=32, split=2, channels=2, steps=16)  # 64 threads, 64 channels a block; picked on
# static SASS counts (see the docstring) until the GPU check's side-by-side timing of V3_CANDIDATES settles it
V3_TARGET_THREADS = 132 * 1024  # v3: aim for about this many threads (half an H200's resident threads) ...
V3_MIN_CHUNK = 64  # ... in chunks of l no shorter than this (rounded up to whole tiles of `steps`)
V3_SHARED_LIMIT = 48 * 1024  # bytes of static shared memory a block may have (v3 halves `steps` to fit)
V3_CANDIDATES = (V3Layout(32, 4, 2, 16), V3Layout(32, 2, 2, 16), V3Layout(128, 1, 1, 16), V3Layout(64, 1, 2, 16))
# (the layouts the GPU check times side by side; tests/gpu compiles each of them)


# ---------------------------------------------------------------- kernel factories
#
# Each factory returns plain Python functions; `_kernel` jit-compiles them for one
# explicit signature (so `compile_ptx` can check them too, see `kernel_signatures`).


def _constants(dtype):
    t = np.dtype(dtype).type
    return t(0.0), t(1.0), t(20.0)


def _device(py_func, dtype):
    """A device function, inlined into its callers (so local arrays passed to it stay in registers)."""
    if SIMULATOR:
        return cuda.jit(device=True)(py_func)
    return cuda.jit(device=True, forceinline=True, fastmath=np.dtype(dtype) == np.float32)(py_func)


def _scan_functions(n, dtype):
    """scan_v1, chunk_state, chunk_carry, chunk_output for state size n."""
    N = n
    ZERO, ONE, THRESHOLD = _constants(dtype)
    ht = numba.from_dtype(np.dtype(dtype))

    def run_steps(u, delta, B, C, z, out, h, a, bi, c, gb, gc, t0, t1, skip, bias, has_z, softplus):
        """Steps t0..t1-1 of channel c from state h (updated in place): writes y, D skip and gate included."""
        # The next step's inputs are loaded a step ahead, so their memory latency overlaps this step's math.
        x_next = u[bi, c, t0] if t0 < t1 else ZERO
        d_next = delta[bi, c, t0] if t0 < t1 else ZERO
        g_next = z[bi, c, t0] if (has_z and t0 < t1) else ZERO
        for t in range(t0, t1):
            x = x_next
            dt = d_next + bias
            g = g_next
            if t + 1 < t1:
                x_next = u[bi, c, t + 1]
                d_next = delta[bi, c, t + 1]
                if has_z:
                    g_next = z[bi, c, t + 1]
            if softplus and dt <= THRESHOLD:
                dt = math.log1p(math.exp(dt))
            dtx = dt * x
            y = ZERO
            for i in range(N):
                h[i] = math.exp(dt * a[i]) * h[i] + dtx * B[bi, gb, i, t]  # h_t = exp(dt A) h + dt B x
                y += h[i] * C[bi, gc, i, t]  # y_t = C_t . h_t
            y += skip * x
            if has_z:
                y = y * g / (ONE + math.exp(-g))  # y * silu(z)
            out[bi, c, t] = y

    steps = _device(run_steps, dtype)

    def scan_v1(u, delta, A, B, C, D, z, delta_bias, initial_state, out, last_state,
                has_D, has_z, has_bias, softplus, has_init):
        idx = cuda.grid(1)
        nb, d, l = u.shape
        if idx >= nb * d:
            return
        bi = idx // d
        c = idx - bi * d  # consecutive threads take consecutive channels (coalesced in (b, l, d) layouts)
        gb = c // (d // B.shape[1])  # the group whose B and C this channel reads
        gc = c // (d // C.shape[1])
        h = cuda.local.array(N, ht)
        a = cuda.local.array(N, ht)
        for i in range(N):
            h[i] = initial_state[bi, c, i] if has_init else ZERO
            a[i] = A[c, i]
        skip = D[c] if has_D else ZERO
        bias = delta_bias[c] if has_bias else ZERO
        steps(u, delta, B, C, z, out, h, a, bi, c, gb, gc, 0, l, skip, bias, has_z, softplus)
        for i in range(N):
            last_state[bi, c, i] = h[i]

    def chunk_state(u, delta, A, B, delta_bias, chunk_h, chunk_dt, chunk_len, has_bias, softplus):
        idx = cuda.grid(1)
        nb, d, l = u.shape
        nchunks = chunk_dt.shape[1]
        if idx >= nb * nchunks * d:
            return
        c = idx % d
        rest = idx // d
        j = rest % nchunks
        bi = rest // nchunks
        gb = c // (d // B.shape[1])
        h = cuda.local.array(N, ht)
        a = cuda.local.array(N, ht)
        for i in range(N):
            h[i] = ZERO
            a[i] = A[c, i]
        bias = delta_bias[c] if has_bias else ZERO
        total_dt = ZERO
        t0 = j * chunk_len
        t1 = min(t0 + chunk_len, l)
        x_next = u[bi, c, t0] if t0 < t1 else ZERO  # prefetched a step ahead, as in scan_v1
        d_next = delta[bi, c, t0] if t0 < t1 else ZERO
        for t in range(t0, t1):
            x = x_next
            dt = d_next + bias
            if t + 1 < t1:
                x_next = u[bi, c, t + 1]
                d_next = delta[bi, c, t + 1]
            if softplus and dt <= THRESHOLD:
                dt = math.log1p(math.exp(dt))
            total_dt += dt
            dtx = dt * x
            for i in range(N):
                h[i] = math.exp(dt * a[i]) * h[i] + dtx * B[bi, gb, i, t]
        for i in range(N):
            chunk_h[bi, j, i, c] = h[i]
        chunk_dt[bi, j, c] = total_dt

    def chunk_carry(A, initial_state, chunk_h, chunk_dt, has_init):
        idx = cuda.grid(1)
        nb, nchunks, n, d = chunk_h.shape
        if idx >= nb * n * d:
            return
        c = idx % d
        rest = idx // d
        i = rest % n
        bi = rest // n
        a = A[c, i]
        h = initial_state[bi, c, i] if has_init else ZERO
        for j in range(nchunks):
            end = chunk_h[bi, j, i, c]
            chunk_h[bi, j, i, c] = h  # now: the state entering chunk j
            h = math.exp(a * chunk_dt[bi, j, c]) * h + end  # prod_t exp(dt_t A) = exp(A sum_t dt_t)

    def chunk_output(u, delta, A, B, C, D, z, delta_bias, chunk_h, out, last_state, chunk_len,
                     has_D, has_z, has_bias, softplus):
        idx = cuda.grid(1)
        nb, d, l = u.shape
        nchunks = chunk_h.shape[1]
        if idx >= nb * nchunks * d:
            return
        c = idx % d
        rest = idx // d
        j = rest % nchunks
        bi = rest // nchunks
        gb = c // (d // B.shape[1])
        gc = c // (d // C.shape[1])
        h = cuda.local.array(N, ht)
        a = cuda.local.array(N, ht)
        for i in range(N):
            h[i] = chunk_h[bi, j, i, c]
            a[i] = A[c, i]
        skip = D[c] if has_D else ZERO
        bias = delta_bias[c] if has_bias else ZERO
        t0 = j * chunk_len
        steps(u, delta, B, C, z, out, h, a, bi, c, gb, gc, t0, min(t0 + chunk_len, l), skip, bias, has_z, softplus)
        if j == nchunks - 1:
            for i in range(N):
                last_state[bi, c, i] = h[i]

    return dict(scan_v1=scan_v1, chunk_state=chunk_state, chunk_carry=chunk_carry, chunk_output=chunk_output)


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


def _update_functions(n, dtype):
    """state_update for state size n."""
    N = n
    ZERO, ONE, THRESHOLD = _constants(dtype)

    def state_update(state, x, dt, A, B, C, D, z, dt_bias, out, has_D, has_z, has_bias, softplus):
        idx = cuda.grid(1)
        nb, d = x.shape
        if idx >= nb * d:
            return
        bi = idx // d
        c = idx - bi * d
        gb = c // (d // B.shape[1])
        gc = c // (d // C.shape[1])
        xv = x[bi, c]
        step = dt[bi, c] + (dt_bias[c] if has_bias else ZERO)
        if softplus and step <= THRESHOLD:
            step = math.log1p(math.exp(step))
        dtx = step * xv
        y = ZERO
        for i in range(N):
            h = math.exp(step * A[c, i]) * state[bi, c, i] + dtx * B[bi, gb, i]
            state[bi, c, i] = h
            y += h * C[bi, gc, i]
        if has_D:
            y += D[c] * xv
        if has_z:
            g = z[bi, c]
            y = y * g / (ONE + math.exp(-g))
        out[bi, c] = y

    return dict(state_update=state_update)


def _conv_functions(dtype):
    """conv_fwd, conv_shift, conv_step (the conv width k is a runtime value)."""
    ZERO, ONE, _ = _constants(dtype)

    def conv_fwd(x, conv_state, weight, bias, out, has_state, has_bias, silu):
        idx = cuda.grid(1)
        nb, d, l = x.shape
        if idx >= nb * l * d:
            return
        c = idx % d
        rest = idx // d
        t = rest % l
        bi = rest // l
        k = weight.shape[1]
        s = conv_state.shape[2]
        acc = bias[c] if has_bias else ZERO
        for j in range(k):
            p = t - (k - 1) + j  # input position this tap reads; < 0 is left context
            if p >= 0:
                acc += weight[c, j] * x[bi, c, p]
            elif has_state:
                acc += weight[c, j] * conv_state[bi, c, s + p]  # the cached inputs stand in for the padding
        if silu:
            acc = acc / (ONE + math.exp(-acc))
        out[bi, c, t] = acc

    def conv_shift(x, conv_state):
        idx = cuda.grid(1)
        nb, d, l = x.shape
        if idx >= nb * d:
            return
        bi = idx // d
        c = idx - bi * d
        s = conv_state.shape[2]
        for m in range(s):  # new state = the last s of [old state, x]; increasing m reads before it overwrites
            q = l + m
            if q < s:
                conv_state[bi, c, m] = conv_state[bi, c, q]
            else:
                conv_state[bi, c, m] = x[bi, c, q - s]

    def conv_step(x, conv_state, weight, bias, out, has_bias, silu):
        idx = cuda.grid(1)
        nb, d = x.shape
        if idx >= nb * d:
            return
        bi = idx // d
        c = idx - bi * d
        k = weight.shape[1]
        s = conv_state.shape[2]
        xv = x[bi, c]
        acc = bias[c] if has_bias else ZERO
        for j in range(k - 1):
            acc += weight[c, j] * conv_state[bi, c, s - (k - 1) + j]
        acc += weight[c, k - 1] * xv
        for m in range(s - 1):
            conv_state[bi, c, m] = conv_state[bi, c, m + 1]
        conv_state[bi, c, s - 1] = xv
        if silu:
            acc = acc / (ONE + math.exp(-acc))
        out[bi, c] = acc

    return dict(conv_fwd=conv_fwd, conv_shift=conv_shift, conv_step=conv_step)


def kernel_signatures(dtype):
    """Explicit numba signatures of every kernel for one float dtype (arrays in any layout)."""
    f = numba.from_dtype(np.dtype(dtype))
    i = numba.int64
    a1, a2, a3, a4 = (numba.types.Array(f, ndim, "A") for ndim in (1, 2, 3, 4))
    v = numba.void
    return dict(
        scan_v1=v(a3, a3, a2, a4, a4, a1, a3, a1, a3, a3, a3, i, i, i, i, i),
        chunk_state=v(a3, a3, a2, a4, a1, a4, a3, i, i, i),
        chunk_carry=v(a2, a3, a4, a3, i),
        chunk_output=v(a3, a3, a2, a4, a4, a1, a3, a1, a4, a3, a3, i, i, i, i, i),
        scan_v3_state=v(a3, a3, a2, a4, a1, a4, a3, i, i, i, i),
        scan_v3_output=v(a3, a3, a2, a4, a4, a1, a3, a1, a3, a4, a3, a3, i, i, i, i, i, i, i, i),
        state_update=v(a3, a2, a2, a2, a3, a3, a1, a2, a1, a2, i, i, i, i),
        conv_fwd=v(a3, a3, a2, a1, a3, i, i, i),
        conv_shift=v(a3, a3),
        conv_step=v(a2, a3, a2, a1, a2, i, i),
        linear=v(a2, a2, a2, i),
        linear_v2=v(a2, a2, a3, i, i),
    )


def kernel_functions(n, dtype, v3_layout=None, linear_layout=None, rows_per_thread=None):
    """The Python functions of every kernel for state size n and one dtype (for compile checks).

    v3 and linear_v2 in the given layouts (default: the module's V3_LAYOUT, LINEAR_V2_LAYOUT and
    the largest row tile).
    """
    return {**_scan_functions(n, dtype), **_scan_v3_functions(n, dtype, v3_layout or V3_LAYOUT),
            **_update_functions(n, dtype), **_conv_functions(dtype),
            **_linear_functions(LINEAR_ROWS[-1], dtype),
            **_linear_v2_functions(rows_per_thread or LINEAR_V2_ROWS_PER_THREAD[-1], dtype,
                                   linear_layout or LINEAR_V2_LAYOUT)}


def _jit(py_func, dtype_name):
    if SIMULATOR:
        return cuda.jit(py_func)
    # fastmath (exp via ex2.approx, flush-to-zero) in float32 only; float64 is the ground-truth mode.
    # Compiled lazily for the exact argument types (array layouts), so that each launch finds its
    # kernel in the dispatcher's type cache; `kernel_signatures` gives the general ('A' layout)
    # signatures the compile_ptx test checks.
    return cuda.jit(fastmath=np.dtype(dtype_name) == np.float32)(py_func)


@functools.lru_cache(maxsize=None)
def _kernel(name, n, dtype_name):
    """The compiled kernel `name` for state size n (0 for the conv kernels) and dtype."""
    dtype = np.dtype(dtype_name)
    if name.startswith("conv"):
        py_func = _conv_functions(dtype)[name]
    elif name == "state_update":
        py_func = _update_functions(n, dtype)[name]
    else:
        py_func = _scan_functions(n, dtype)[name]
    return _jit(py_func, dtype_name)


@functools.lru_cache(maxsize=None)
def _v3_kernel(name, n, dtype_name, layout):
    return _jit(_scan_v3_functions(n, np.dtype(dtype_name), layout)[name], dtype_name)


# ---------------------------------------------------------------- arrays, streams, launches


def _check_array(func, name, array):
    """CuPy (anything with __cuda_array_interface__) on a GPU; NumPy too under the simulator."""
    if SIMULATOR:
        if isinstance(array, np.ndarray):
            return
        raise TypeError(f"{func}: {name} is a {type(array).__name__}; under the CUDA simulator pass NumPy arrays")
    if isinstance(array, np.ndarray):
        raise TypeError(f"{func}: {name} is a NumPy array in host memory; the CUDA kernels take CuPy arrays on "
                        "the GPU (cupy.asarray(...), or model.to('cupy')). A NumPy array would be copied to the "
                        "device and back at every launch.")
    if not hasattr(array, "__cuda_array_interface__"):
        raise TypeError(f"{func}: {name} is a {type(array).__name__}, not a GPU array (expected a CuPy array)")


def _arg(array):
    """A kernel argument: a zero-copy numba view of a CuPy array (a plain ndarray view under the simulator)."""
    if SIMULATOR:  # wrap the array itself: the simulator's own transfer would copy (and refuse strided views)
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(np.asarray(array))
    return _DeviceView(array)


class _DeviceView:
    """A CuPy array's __cuda_array_interface__ without its "stream" entry.

    Numba synchronises the exporter's stream for every array argument that names one
    (CUDA Array Interface v3); the kernels run on that very stream, so the wait is
    needless, and it would stall every launch and break CUDA-graph capture.
    """

    __slots__ = ("__cuda_array_interface__", "owner")

    def __init__(self, array):
        interface = dict(array.__cuda_array_interface__)
        interface.pop("stream", None)
        self.__cuda_array_interface__ = interface
        self.owner = array  # keeps the memory alive until the launch is queued


_streams = {}


def _stream():
    """CuPy's current stream as a numba stream (0, the legacy default stream, when CuPy uses it)."""
    if SIMULATOR:
        return 0
    import cupy

    ptr = cupy.cuda.get_current_stream().ptr
    if ptr == 0:
        return 0
    if ptr not in _streams:
        _streams[ptr] = cuda.external_stream(ptr)
    return _streams[ptr]


_dummies = {}


def _dummy(xp, dtype, ndim):
    """A one-element placeholder for an absent optional argument (never read: its flag is 0)."""
    key = (xp.__name__, np.dtype(dtype).name, ndim, None if SIMULATOR else _device_id(xp))
    if key not in _dummies:
        _dummies[key] = _arg(xp.zeros((1,) * ndim, dtype=dtype))
    return _dummies[key]


def _device_id(xp):
    return xp.cuda.Device().id


def _launch(name, n, dtype, threads_total, *args):
    blocks = max(1, -(-threads_total // THREADS))
    _kernel(name, n, np.dtype(dtype).name)[blocks, THREADS, _stream()](*args)


def _opt(xp, array, ct, ndim):
    """(kernel argument, flag) for an optional array."""
    if array is None:
        return _dummy(xp, ct, ndim), 0
    return _arg(array.astype(ct, copy=False)), 1


def _groups4(M, b, d, n, l, xp):
    """B or C as a (b, g, n, l) view: (b, n, l) -> g = 1; (d, n) -> g = d, broadcast over b and l."""
    if M.ndim == 3:
        return M[:, None, :, :]
    if M.ndim == 2:  # fixed per channel (S4 style)
        return xp.broadcast_to(M[None, :, :, None], (b, d, n, l))
    return M


def _finish_dtype(out, dtype):
    return out if out.dtype == dtype else out.astype(dtype)


# ---------------------------------------------------------------- selective scan


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, initial_state=None, chunk_size=None, version=None):
    """The selective scan on the GPU; arguments and result as `minimamba.ops.selective_scan_ref`.

    Extra keywords: `version` "v1", "chunked" or "v3" (None: v1 for short prompts or
    many rows, else the module's SCAN_LONG; see the module docstring); `chunk_size` the
    chunk of l of chunked and v3 (None: enough chunks to fill the GPU). The output is a
    (b, d, l) view of a (b, l, d) array, the layout the model reads next.
    """
    func = "selective_scan_fn"
    for name, array in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                        ("delta_bias", delta_bias), ("initial_state", initial_state)):
        if array is not None:
            _check_array(func, name, array)
    b, d, l, n = check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    xp = array_module(u)
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    u_, delta_, A_ = (x.astype(ct, copy=False) for x in (u, delta, A))
    B4 = _groups4(B.astype(ct, copy=False), b, d, n, l, xp)  # (b, g, n, l)
    C4 = _groups4(C.astype(ct, copy=False), b, d, n, l, xp)
    D_, has_D = _opt(xp, D, ct, 1)
    z_, has_z = _opt(xp, z, ct, 3)
    bias_, has_bias = _opt(xp, delta_bias, ct, 1)
    init_, has_init = _opt(xp, initial_state, ct, 3)
    out = xp.empty((b, l, d), dtype=ct).transpose(0, 2, 1)  # (b, d, l), channels contiguous
    last_state = xp.empty((b, d, n), dtype=ct)
    softplus = int(bool(delta_softplus))
    if version is None:
        version = "v1" if (b * d >= V1_MIN_ROWS or l <= 4 * MIN_CHUNK) else SCAN_LONG
    if version not in ("v1", "chunked", "v3"):
        raise ValueError(f"version must be None, 'v1', 'chunked' or 'v3', got {version!r}")
    if l == 0:  # nothing to scan (and no zero-size arrays handed to a launch): the state passes through
        last_state[...] = 0 if initial_state is None else initial_state
    elif version == "v1":
        _launch("scan_v1", n, ct, b * d, _arg(u_), _arg(delta_), _arg(A_), _arg(B4), _arg(C4), D_, z_, bias_,
                init_, _arg(out), _arg(last_state), has_D, has_z, has_bias, softplus, has_init)
    elif version == "chunked":
        if chunk_size is None:
            nchunks = max(1, min(-(-CHUNK_TARGET_THREADS // (b * d)), -(-l // MIN_CHUNK)))
            chunk_size = -(-l // nchunks)
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        chunk_size = int(chunk_size)
        nchunks = -(-l // chunk_size)
        chunk_h = xp.empty((b, nchunks, n, d), dtype=ct)  # end states, then states entering each chunk
        chunk_dt = xp.empty((b, nchunks, d), dtype=ct)  # sum of delta over each chunk
        a_u, a_delta, a_A, a_B = _arg(u_), _arg(delta_), _arg(A_), _arg(B4)
        a_h, a_dt = _arg(chunk_h), _arg(chunk_dt)
        _launch("chunk_state", n, ct, b * nchunks * d, a_u, a_delta, a_A, a_B, bias_, a_h, a_dt,
                chunk_size, has_bias, softplus)
        _launch("chunk_carry", n, ct, b * n * d, a_A, init_, a_h, a_dt, has_init)
        _launch("chunk_output", n, ct, b * nchunks * d, a_u, a_delta, a_A, a_B, _arg(C4), D_, z_, bias_, a_h,
                _arg(out), _arg(last_state), chunk_size, has_D, has_z, has_bias, softplus)
    elif version == "v3":
        _scan_v3(xp, ct, chunk_size, u_, delta_, A_, B4, C4, D_, z_, bias_, init_, out, last_state,
                 has_D, has_z, has_bias, softplus, has_init)
    out = _finish_dtype(out, u.dtype)
    return (out, last_state) if return_last_state else out


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


def _scan_v3(xp, ct, chunk_size, u, delta, A, B4, C4, D_, z_, bias_, init_, out, last_state,
             has_D, has_z, has_bias, softplus, has_init):
    """The v3 launches: scan_v3_state and chunk_carry when there is more than one chunk, then scan_v3_output."""
    b, d, l = u.shape
    n = A.shape[1]
    layout = _v3_fit(V3_LAYOUT, n, ct)
    channels = layout.lanes * layout.channels  # per block
    threads = layout.lanes * layout.split  # per block
    seg = math.gcd(d // B4.shape[1], d // C4.shape[1])  # a block's channels share one group of B and one of C
    blocks = (d // seg) * -(-seg // channels)  # per (batch row, chunk)
    if chunk_size is None:
        nchunks = max(1, min(round(V3_TARGET_THREADS / (b * blocks * threads)), -(-l // V3_MIN_CHUNK)))
        chunk_size = -(-l // nchunks)
        chunk_size = -(-chunk_size // layout.steps) * layout.steps  # whole tiles
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunk_size = int(chunk_size)
    nchunks = -(-l // chunk_size)
    a_u, a_delta, a_A, a_B = _arg(u), _arg(delta), _arg(A), _arg(B4)
    stream = _stream()
    if nchunks > 1:
        chunk_h = xp.empty((b, nchunks, n, d), dtype=ct)  # end states from 0, then states entering each chunk
        chunk_dt = xp.empty((b, nchunks, d), dtype=ct)  # sum of delta over each chunk
        chunk_h[:, -1] = 0  # the last chunk's end is never needed: zeros keep chunk_carry's last step harmless
        chunk_dt[:, -1] = 0
        a_h = _arg(chunk_h)
        a_dt = _arg(chunk_dt)
        _v3_kernel("scan_v3_state", n, ct.name, layout)[b * (nchunks - 1) * blocks, threads, stream](
            a_u, a_delta, a_A, a_B, bias_, a_h, a_dt, chunk_size, seg, has_bias, softplus)
        _launch("chunk_carry", n, ct, b * n * d, a_A, init_, a_h, a_dt, has_init)
    else:
        a_h = _dummy(xp, ct, 4)
    _v3_kernel("scan_v3_output", n, ct.name, layout)[b * nchunks * blocks, threads, stream](
        a_u, a_delta, a_A, a_B, _arg(C4), D_, z_, bias_, init_, a_h, _arg(out), _arg(last_state), chunk_size, seg,
        has_D, has_z, has_bias, softplus, has_init, int(nchunks > 1))


# ---------------------------------------------------------------- single-step state update


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step of the scan, `state` updated in place; as `minimamba.ops.selective_state_update`."""
    func = "selective_state_update"
    for name, array in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D),
                        ("z", z), ("dt_bias", dt_bias)):
        if array is not None:
            _check_array(func, name, array)
    b, d, n = check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias)
    xp = array_module(x)
    ct = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    work = state if state.dtype == ct else state.astype(ct)  # updated in place when the dtypes agree
    B3 = B.astype(ct, copy=False)
    C3 = C.astype(ct, copy=False)
    B3 = B3[:, None, :] if B3.ndim == 2 else B3  # (b, g, n)
    C3 = C3[:, None, :] if C3.ndim == 2 else C3
    D_, has_D = _opt(xp, D, ct, 1)
    z_, has_z = _opt(xp, z, ct, 2)
    bias_, has_bias = _opt(xp, dt_bias, ct, 1)
    out = xp.empty((b, d), dtype=ct)
    _launch("state_update", n, ct, b * d, _arg(work), _arg(x.astype(ct, copy=False)),
            _arg(dt.astype(ct, copy=False)), _arg(A.astype(ct, copy=False)), _arg(B3), _arg(C3), D_, z_, bias_,
            _arg(out), has_D, has_z, has_bias, int(bool(dt_softplus)))
    if work is not state:
        state[...] = work
    return _finish_dtype(out, x.dtype)


# ---------------------------------------------------------------- causal depthwise conv


def _activation_flag(activation):
    if activation is None:
        return 0
    if activation in ("silu", "swish"):
        return 1
    raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


def causal_conv1d_fn(x, weight, bias=None, activation=None):
    """Causal depthwise conv of a whole sequence; as `minimamba.ops.causal_conv1d_fn`.

    The output is a (b, d, l) view of a (b, l, d) array (channels contiguous).
    """
    func = "causal_conv1d_fn"
    for name, array in (("x", x), ("weight", weight), ("bias", bias)):
        if array is not None:
            _check_array(func, name, array)
    b, d, l, _ = check_conv_args(x, weight, bias)
    silu = _activation_flag(activation)
    xp = array_module(x)
    ct = compute_dtype(x, weight)
    bias_, has_bias = _opt(xp, bias, ct, 1)
    out = xp.empty((b, l, d), dtype=ct).transpose(0, 2, 1)  # (b, d, l)
    _launch("conv_fwd", 0, ct, b * l * d, _arg(x.astype(ct, copy=False)), _dummy(xp, ct, 3),
            _arg(weight.astype(ct, copy=False)), bias_, _arg(out), 0, has_bias, silu)
    return _finish_dtype(out, x.dtype)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """The causal conv continued from `conv_state` (updated in place); as `minimamba.ops.causal_conv1d_update`."""
    func = "causal_conv1d_update"
    for name, array in (("x", x), ("conv_state", conv_state), ("weight", weight), ("bias", bias)):
        if array is not None:
            _check_array(func, name, array)
    single = x.ndim == 2
    x3 = x[:, :, None] if single else x
    b, d, l, k = check_conv_update_args(x3, conv_state, weight, bias)
    silu = _activation_flag(activation)
    xp = array_module(x)
    ct = compute_dtype(x, weight)
    work = conv_state if conv_state.dtype == ct else conv_state.astype(ct)
    if work.shape[2] == 0:  # k == 1: no context to keep
        return causal_conv1d_fn(x3, weight, bias, activation)[:, :, 0] if single else \
            causal_conv1d_fn(x3, weight, bias, activation)
    bias_, has_bias = _opt(xp, bias, ct, 1)
    a_x = _arg(x3.astype(ct, copy=False))
    a_state, a_weight = _arg(work), _arg(weight.astype(ct, copy=False))
    if l == 1:  # decode: output and shift in one launch
        out = xp.empty((b, d), dtype=ct)
        x2 = x3[:, :, 0].astype(ct, copy=False)
        _launch("conv_step", 0, ct, b * d, _arg(x2), a_state, a_weight, bias_, _arg(out), has_bias, silu)
        out = out[:, :, None]
    else:
        out = xp.empty((b, l, d), dtype=ct).transpose(0, 2, 1)
        _launch("conv_fwd", 0, ct, b * l * d, a_x, a_state, a_weight, bias_, _arg(out), 1, has_bias, silu)
        _launch("conv_shift", 0, ct, b * d, a_x, a_state)  # after conv_fwd (same stream): it read the old state
    if work is not conv_state:
        conv_state[...] = work
    out = _finish_dtype(out, x.dtype)
    return out[:, :, 0] if single else out


# ---------------------------------------------------------------- linear layer (for the captured decode step)


LINEAR_ROWS = (1, 4, 16, 64)  # linear: compile-time batch sizes; a batch runs in the smallest that holds it


def _linear_functions(rows, dtype):
    """linear for up to `rows` input rows."""
    BM = rows
    MAXT = 128  # the largest block this kernel is launched with (THREADS)
    ZERO = np.dtype(dtype).type(0.0)
    ht = numba.from_dtype(np.dtype(dtype))

    def linear(x, weight, out, nrows):
        # One block per output feature o; its threads split the input width (coalesced reads of
        # the weight row, read once for all batch rows), then add their partial sums in shared memory.
        o = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        k = weight.shape[1]
        partial = cuda.shared.array((BM, MAXT), ht)
        acc = cuda.local.array(BM, ht)
        for r in range(BM):
            acc[r] = ZERO
        for kk in range(tid, k, nthreads):
            w = weight[o, kk]
            for r in range(BM):
                if r < nrows:
                    acc[r] += w * x[r, kk]
        for r in range(BM):
            partial[r, tid] = acc[r]
        cuda.syncthreads()
        step = nthreads // 2
        while step > 0:  # tree sum over the block (nthreads is a power of two)
            if tid < step:
                for r in range(BM):
                    partial[r, tid] += partial[r, tid + step]
            cuda.syncthreads()
            step //= 2
        for r in range(tid, nrows, nthreads):
            out[r, o] = partial[r, 0]

    return dict(linear=linear)


@functools.lru_cache(maxsize=None)
def _linear_kernel(rows, dtype_name):
    return _jit(_linear_functions(rows, np.dtype(dtype_name))["linear"], dtype_name)


class LinearLayout(NamedTuple):
    """The compile-time shape of a linear_v2 block: threads (rows x cols), each a tile of rows x cols_per_thread."""

    row_threads: int
    col_threads: int
    cols_per_thread: int
    k_tile: int  # input width staged in shared memory at a time


LINEAR = "v1"  # decode projections: "v1" (measured) or "v2" (not yet measured; v1 still runs batches of 1)
LINEAR_V2_LAYOUT = LinearLayout(row_threads=16, col_threads=16, cols_per_thread=4, k_tile=32)  # 256 threads
LINEAR_V2_ROWS_PER_THREAD = (1, 2, 4)  # compile-time row tiles: a batch runs in the smallest that holds it
LINEAR_V2_MIN_ROWS = 2  # LINEAR = "v2" sends batches of at least this many rows to v2, smaller ones to v1
LINEAR_V2_BLOCKS = 2 * 132  # v2 splits the input width over blocks until about this many run (2 per H200 SM)


def _linear_v2_functions(rows_per_thread, dtype, layout):
    """linear_v2 for row tiles of rows_per_thread rows per thread."""
    TY, TX, TO, BK = layout
    TM = rows_per_thread
    BM = TY * TM  # rows of a block (all the batch rows of a launch)
    BO = TX * TO  # output features of a block
    BMP, BOP = BM + 1, BO + 1  # shared tiles padded by a column: no bank conflicts on either side
    TMO = TM * TO
    ZERO = np.dtype(dtype).type(0.0)
    ht = numba.from_dtype(np.dtype(dtype))

    def linear_v2(x, weight, out, nrows, k_len):
        # Block (feature tile, split of the input width): out[split, r, o] for all rows r and BO features o,
        # summed over k in the split's range. x and weight go through shared memory a (BK wide) tile at a time,
        # so each weight element is read from memory once per launch, for all rows; each thread keeps a
        # TM x TO tile of outputs in registers (rows trow + TY * m, features tcol + TX * p).
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        trow = tid // TX
        tcol = tid - trow * TX
        o, k = weight.shape
        ntiles = (o + BO - 1) // BO
        split = cuda.blockIdx.x // ntiles
        o0 = (cuda.blockIdx.x - split * ntiles) * BO
        kb = split * k_len
        ke = min(kb + k_len, k)
        sx = cuda.shared.array((BK, BMP), ht)  # transposed tiles
        sw = cuda.shared.array((BK, BOP), ht)
        acc = cuda.local.array(TMO, ht)
        xr = cuda.local.array(TM, ht)
        wr = cuda.local.array(TO, ht)
        for e in range(TMO):
            acc[e] = ZERO
        for k0 in range(kb, ke, BK):
            kt = min(BK, ke - k0)
            for q in range(tid, BM * BK, nthreads):  # the input width fastest: coalesced reads
                r = q // BK
                kk = q - r * BK
                sx[kk, r] = x[r, k0 + kk] if (r < nrows and kk < kt) else ZERO
            for q in range(tid, BO * BK, nthreads):
                oo = q // BK
                kk = q - oo * BK
                sw[kk, oo] = weight[o0 + oo, k0 + kk] if (o0 + oo < o and kk < kt) else ZERO
            cuda.syncthreads()
            for kk in range(BK):  # past kt the tiles hold zeros
                for m in range(TM):
                    xr[m] = sx[kk, trow + TY * m]
                for p in range(TO):
                    wr[p] = sw[kk, tcol + TX * p]
                for m in range(TM):
                    for p in range(TO):
                        acc[m * TO + p] += xr[m] * wr[p]
            cuda.syncthreads()
        for m in range(TM):
            r = trow + TY * m
            for p in range(TO):
                oo = o0 + tcol + TX * p
                if r < nrows and oo < o:
                    out[split, r, oo] = acc[m * TO + p]

    return dict(linear_v2=linear_v2)


@functools.lru_cache(maxsize=None)
def _linear_v2_kernel(rows_per_thread, dtype_name, layout):
    return _jit(_linear_v2_functions(rows_per_thread, np.dtype(dtype_name), layout)["linear_v2"], dtype_name)


def linear(x, weight, bias=None, version=None):
    """x @ weight.T (+ bias) without cuBLAS (so that CuPy lets a CUDA graph capture it).

    Args: x (b, k), any strides; weight (o, k); bias (o,) or None; version "v1", "v2" or
    None (the module's LINEAR; under "v2", batches under LINEAR_V2_MIN_ROWS rows still run v1).
    Returns (b, o). Built for decode steps (small b); each weight element is read once per
    launch of 64 rows. v1: one block per output feature. v2: tiles (see _linear_v2_functions),
    the input width split over blocks when the features alone would leave the GPU idle.
    """
    for name, array in (("x", x), ("weight", weight), ("bias", bias)):
        if array is not None:
            _check_array("linear", name, array)
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear: x has shape {tuple(x.shape)} and weight {tuple(weight.shape)}; "
                         "expected (b, k) and (o, k)")
    check_shape("bias", bias, (weight.shape[0],))
    version = LINEAR if version is None else version
    if version not in ("v1", "v2"):
        raise ValueError(f"linear: version must be None, 'v1' or 'v2', got {version!r}")
    xp = array_module(x)
    ct = compute_dtype(x, weight)
    b, o = x.shape[0], weight.shape[0]
    out = xp.empty((b, o), dtype=ct)
    a_w = _arg(weight.astype(ct, copy=False))
    xc = x.astype(ct, copy=False)
    if 0 in (b, o, weight.shape[1]):  # nothing to compute, or an empty sum: no zero-size launch
        out[...] = 0
    elif version == "v2" and b >= LINEAR_V2_MIN_ROWS:
        _linear_v2(xp, xc, weight, a_w, out, ct)
    else:
        _linear_v1(xc, a_w, out, o, ct)
    if bias is not None:
        out += bias.astype(ct, copy=False)
    return out


def _linear_v1(xc, a_w, out, o, ct):
    if THREADS > 128 or THREADS & (THREADS - 1):
        raise ValueError(f"linear needs THREADS to be a power of two <= 128, got {THREADS}")
    b = xc.shape[0]
    for start in range(0, b, LINEAR_ROWS[-1]):
        rows = min(b - start, LINEAR_ROWS[-1])
        bucket = next(size for size in LINEAR_ROWS if size >= rows)
        kernel = _linear_kernel(bucket, ct.name)
        kernel[o, THREADS, _stream()](_arg(xc[start:start + rows]), a_w, _arg(out[start:start + rows]), rows)


def _linear_v2(xp, xc, weight, a_w, out, ct):
    layout = LINEAR_V2_LAYOUT
    o, k = weight.shape
    tiles = -(-o // (layout.col_threads * layout.cols_per_thread))
    splits = max(1, min(LINEAR_V2_BLOCKS // tiles, -(-k // (4 * layout.k_tile))))  # >= 4 k-tiles per split
    k_len = -(-k // splits)
    k_len = -(-k_len // layout.k_tile) * layout.k_tile
    splits = -(-k // k_len) if k else 1
    most = layout.row_threads * LINEAR_V2_ROWS_PER_THREAD[-1]
    b = xc.shape[0]
    for start in range(0, b, most):
        rows = min(b - start, most)
        tm = next(m for m in LINEAR_V2_ROWS_PER_THREAD if layout.row_threads * m >= rows)
        kernel = _linear_v2_kernel(tm, ct.name, layout)
        part = out[start:start + rows][None] if splits == 1 else xp.empty((splits, rows, o), dtype=ct)
        kernel[tiles * splits, layout.row_threads * layout.col_threads, _stream()](
            _arg(xc[start:start + rows]), a_w, _arg(part), rows, k_len)
        if splits > 1:
            out[start:start + rows] = part.sum(axis=0)  # (rows, o): the splits' partial sums
