"""linear (x @ W.T for the decode step): every version, checked against `minimamba.ops.linear` and timed.

    python -m minimamba.kernels.lab.linear                        a GPU: check, then the 130m decode projections
    NUMBA_ENABLE_CUDASIM=1 python -m minimamba.kernels.lab.linear   the simulator: the check, at tiny size

The decode step is captured in a CUDA graph (kernels/cuda_graph.py), where CuPy refuses cuBLAS, so
its projections need a kernel of their own. Versions (figures in kernels/lab/README.md):

    1 v1  one block per output feature, threads over the input width, shared-memory tree sum; every
          thread re-reads x for all rows (up to 64) per weight element  [library]
    2 v2  tiled: 16 x 16 threads compute 64 features for all rows, x and W staged in shared memory 32
          inputs at a time, a 4 x 4 (or 1 x 4, 2 x 4) tile of outputs a thread; each weight element read
          once per launch; the input width split over blocks when the features alone give few blocks

Each time is the GPU work alone; GB/s counts the weight bytes (all a decode projection must read).
The whole decode step with each version (CUDA graph, batch 1 and 64) is timed by lab/model.py.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import NamedTuple

import numba
import numpy as np
from numba import cuda

from minimamba import ops
from minimamba.kernels import cuda as kc
from minimamba.kernels.cuda import _arg, _jit, _stream
from minimamba.kernels.lab import common
from minimamba.kernels.lab.common import SIMULATOR, compare, kernel_time, say, to_device, to_host
from minimamba.ops import array_module

# ---------------------------------------------------------------- version 2: v2


class LinearLayout(NamedTuple):
    """The compile-time shape of a linear_v2 block: threads (rows x cols), each a tile of rows x cols_per_thread."""

    row_threads: int
    col_threads: int
    cols_per_thread: int
    k_tile: int  # input width staged in shared memory at a time


LINEAR_V2_LAYOUT = LinearLayout(row_threads=16, col_threads=16, cols_per_thread=4, k_tile=32)  # 256 threads
LINEAR_V2_ROWS_PER_THREAD = (1, 2, 4)  # compile-time row tiles: a batch runs in the smallest that holds it
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

def linear_v2(x, weight, bias=None):
    """Version 2; arguments and result as kernels.cuda.linear (and ops.linear)."""
    return kc.linear_with(_linear_v2, x, weight, bias)


def _linear_v2(xc, a_w, out, ct):
    layout = LINEAR_V2_LAYOUT
    (b, k), o = xc.shape, out.shape[1]
    tiles = -(-o // (layout.col_threads * layout.cols_per_thread))
    splits = max(1, min(LINEAR_V2_BLOCKS // tiles, -(-k // (4 * layout.k_tile))))  # >= 4 k-tiles per split
    k_len = -(-k // splits)
    k_len = -(-k_len // layout.k_tile) * layout.k_tile
    splits = -(-k // k_len)
    most = layout.row_threads * LINEAR_V2_ROWS_PER_THREAD[-1]
    for start in range(0, b, most):
        rows = min(b - start, most)
        tm = next(m for m in LINEAR_V2_ROWS_PER_THREAD if layout.row_threads * m >= rows)
        kernel = _linear_v2_kernel(tm, ct.name, layout)
        part = out[start:start + rows][None] if splits == 1 else array_module(out).empty((splits, rows, o), dtype=ct)
        kernel[tiles * splits, layout.row_threads * layout.col_threads, _stream()](
            _arg(xc[start:start + rows]), a_w, _arg(part), rows, k_len)
        if splits > 1:
            out[start:start + rows] = part.sum(axis=0)  # (rows, o): the splits' partial sums


def kernel_signatures(dtype):
    """Explicit numba signatures of this file's kernels (for the compile_ptx test)."""
    v, i, a1, a2, a3, a4 = kc.signature_types(dtype)
    return dict(linear_v2=v(a2, a2, a3, i, i))


def kernel_functions(dtype, rows_per_thread=None, layout=None):
    """The Python functions of this file's kernels for one dtype, row tile and layout (default: the largest
    tile, LINEAR_V2_LAYOUT)."""
    return _linear_v2_functions(rows_per_thread or LINEAR_V2_ROWS_PER_THREAD[-1], dtype, layout or LINEAR_V2_LAYOUT)


# ---------------------------------------------------------------- the versions, the check, the timer


VERSIONS = [  # (number, name, idea, function with ops.linear's arguments)
    (1, "v1", "one block per output feature, tree sum in shared memory  [library]", kc.linear),
    (2, "v2", "tiled 16 x 16 threads, x and W staged in shared memory, W read once, split-K", linear_v2),
]
CHECK_CASES = [(1, 37, 11), (5, 37, 11), (20, 37, 11), (70, 40, 130)]  # (rows, inputs, features): a partial
# tile of inputs (37 = 4 x 8 + 5), of features, of rows; 70 rows: past the 64 rows one launch takes
CHECK_TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}  # float32: ~sqrt(k) roundings of 6e-8 on
# sums of ~6 (|x w| ~ 1, k <= 40) with margin; float64 to its rounding
DECODE_130M = [("in_proj", 768, 3072), ("x_proj", 1536, 80), ("dt_proj", 48, 1536), ("out_proj", 1536, 768),
               ("lm_head", 768, 50280)]  # (name, inputs, features) of the 130m model's decode projections
LAYERS_130M = 24


def check(versions=VERSIONS, dtypes=(np.float32, np.float64), cases=CHECK_CASES):
    """Every version against ops.linear in float64 (x a strided view, with a bias); returns {name: max rel err}."""
    rng = np.random.default_rng(0)
    errors = {}
    for dtype in dtypes:
        for rows, k, o in cases:
            base = rng.standard_normal((rows, 2 * k)).astype(dtype)
            weight = rng.standard_normal((o, k)).astype(dtype)
            bias = rng.standard_normal(o).astype(dtype)
            ref = ops.linear(base[:, ::2].astype(np.float64), weight.astype(np.float64), bias.astype(np.float64))
            say(f"check {rows} rows x {k} inputs -> {o} features, {np.dtype(dtype).name}, against ops.linear "
                f"in float64:")
            for number, name, _, func in versions:
                got = func(to_device(base)[:, ::2], to_device(weight), to_device(bias))
                passed, err = compare(f"{number} {name}", to_host(got), ref, CHECK_TOL[np.dtype(dtype)])
                key = f"{name} {np.dtype(dtype).name}"
                errors[key] = max(errors.get(key, 0.0), err if passed else float("inf"))
    return errors


def bench(batches=(1, 64), versions=VERSIONS, shapes=DECODE_130M, results=None):
    """Each version on each decode projection (float32); returns {"linear_b{batch}_{name}": seconds per step}
    (the projections of LAYERS_130M layers and the head, kernel time alone)."""
    results = {} if results is None else results
    rng = np.random.default_rng(1)
    for batch in batches:
        for number, name, _, func in versions:
            step = 0.0
            for label, k, o in shapes:
                x = to_device(rng.standard_normal((batch, k)).astype(np.float32))
                weight = to_device(rng.standard_normal((o, k)).astype(np.float32))
                seconds = kernel_time(functools.partial(func, x, weight))
                step += seconds * (1 if label == "lm_head" else LAYERS_130M)
                say(f"linear b={batch:2d} {number} {name} {label:8s} {k:5d} -> {o:5d}: {seconds * 1e6:8.1f} us, "
                    f"{4 * k * o / seconds / 1e9:6.0f} GB/s of weights")
            results[f"linear_b{batch}_{name}"] = step
            say(f"linear b={batch:2d} {number} {name}: {step * 1e3:.2f} ms of projections a decode step "
                f"({LAYERS_130M} layers + head) = {batch / step:,.0f} tok/s if nothing else ran")
    return results


@contextlib.contextmanager
def small_blocks(active=True):
    """Blocks of 8 threads for both versions while active (the simulator runs each thread as a Python thread)."""
    global LINEAR_V2_LAYOUT
    saved = kc.THREADS, LINEAR_V2_LAYOUT
    if active:
        kc.THREADS, LINEAR_V2_LAYOUT = 8, LinearLayout(row_threads=2, col_threads=4, cols_per_thread=2, k_tile=8)
    try:
        yield
    finally:
        kc.THREADS, LINEAR_V2_LAYOUT = saved


def main(argv=None):
    parser = common.parser("minimamba.kernels.lab.linear", __doc__)
    parser.add_argument("--batches", default="1,64", help="batch sizes to time (GPU)")
    args = parser.parse_args(argv)
    versions = common.select(VERSIONS, args.versions)
    with small_blocks(SIMULATOR):
        failed = common.failures(check(versions, cases=CHECK_CASES[:3] if SIMULATOR else CHECK_CASES))
        if not args.check_only:
            if SIMULATOR:  # time at a tiny shape: shows the timer runs, says nothing of speed
                bench((2,), versions, shapes=[("tiny", 16, 8)])
            else:
                bench(tuple(int(b) for b in args.batches.split(",")), versions)
    return common.verdict(failed)


if __name__ == "__main__":
    sys.exit(main())
