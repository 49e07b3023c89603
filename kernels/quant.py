"""Numba CPU kernels that multiply straight from packed int8 / int4 weights.

The readable twin is `minimamba.quant.QuantizedWeight.linear` with the NumPy path
(dequantize the matrix, then `x @ W.T`); tests/test_quant.py compares them. The
formats are llama.cpp's Q8_0 and Q4_0 blocks (see minimamba/quant.py): per row of
K weights, K / block_size float16 scales and the packed integers.

Versions, and what each parallelises over:

    matvec       v3  x (m, K) with m <= MATVEC_MAX_ROWS (decode: m = batch): prange over
                     groups of 4 output rows, which share each load of x; the integers
                     are widened to float32 in registers. Each row keeps 16 float32 lanes
                     across all its blocks (the block's scale applied lane by lane; int4's
                     -8 offset taken out as 8 * (x_lo + x_hi) per lane) and sums them once
                     per row. The group's 4 rows are contiguous bytes, and the kernel asks
                     for them PREFETCH_AHEAD bytes before it reads them (llvm.prefetch):
                     the hardware prefetcher alone left each core at ~5 GB/s. The 4 rows'
                     bytes stay in L1 while the m inputs pass over them, so every weight
                     byte comes from memory once per call, whatever m is. No float copy
                     of the matrix exists. On the 2-core machine, the 73 decode matvecs of
                     the 130m shape (24 x in_proj, x_proj, out_proj, and the 50280-row
                     head), best of 8: int8 13.8 ms in v2 -> 6.8 ms (19.7 GB/s), int4 9.8 ->
                     6.7 ms (int4 is bound by its unpacking, ~23 G weights/s on 2 cores);
                     NumPy's float32 BLAS takes 17.2 ms (29 GB/s) for the same products.
                     (v2 reduced the lanes to one number per block of 32, for int8, and
                     had no prefetch; v1, 32 lanes per row, the scale inside the loop,
                     integer nibble arithmetic - which Numba widens to int64, 8 lanes -
                     and indices LLVM could not prove >= 0, which made gathers: int4 ran
                     at a quarter of v2's speed, int8 at three quarters.)
    matmul       v1  x (m, K) with m > MATVEC_MAX_ROWS (prefill): the matrix is walked in
                     tiles of rows; each tile is dequantized into one float buffer
                     (prange over its rows) and multiplied by NumPy's BLAS (x @ tile.T
                     written into the tile's columns of the output; an earlier version
                     wrote (rows, m) slabs and transposed the whole output at the end,
                     a copy that cost more than the product: in_proj at 512 tokens 17.7 ms
                     against float32's 7.2, now 8.3). The buffer is TILE_BYTES (16 MB), reused for every tile, so
                     the float copy never exceeds one tile (on the 130m shape a layer's
                     matrix is one tile; the 154 MB head, when every position's logits are
                     asked for, is ten). Dequantizing costs ~1/m of the multiply; what costs
                     is the number of BLAS calls: on the shared 2-core machine a 512-token
                     prefill of 6 layers of the 130m shape took, best of 4, float32 0.93 s,
                     int8 / int4 4.2 / 3.7 s with 1 MB tiles, 1.9 / 1.5 s with 4 MB, and
                     1.26 / 0.99 s with one tile per matrix: each threaded BLAS call waits
                     for its slowest thread, and the machine's other loads make that slow.

The float16 scales are read as their bits (Numba has no float16 type) and widened
by one instruction (`fpext half -> float`, vcvtph2ps with F16C).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from llvmlite.binding import llvm_version_info
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

FASTMATH = {"contract", "reassoc", "nsz", "arcp"}  # as kernels/cpu.py: NaN and inf still propagate
LANES = 32  # integers per accumulation group (the smallest block size); a fixed trip count LLVM vectorises
HALF_LANES = LANES // 2  # int4: bytes per step (32 weights)
MATVEC_MAX_ROWS = 8  # inputs up to this many rows (decode batch) use matvec, more use the tiled matmul
# Below this many multiply-adds a matvec runs on the calling thread: x_proj of the 130m shape
# (80 x 1536) took 0.22 ms per call with the thread pool on the shared machine, for ~25 us of work.
PARALLEL_MIN = 1 << 19
PREFETCH_AHEAD = 4096  # bytes: the matvecs ask for the weights this far ahead of their reading (see _prefetch)
TILE_BYTES = 16 << 20  # float32 bytes of one dequantized tile in the matmul (see matmul above)


@intrinsic
def _half_to_float32(typingctx, bits):
    """float16 bits (uint16) -> float32, exactly: reinterpret as half, then widen."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _prefetch(typingctx, flat, index):
    """Ask the CPU to bring the cache line holding flat[index] into cache (llvm.prefetch: read, keep).

    A hint only: it never faults and changes no value. The matvecs walk each group's rows
    in step, four streams at once, and the hardware prefetcher alone kept one core at
    ~5 GB/s of the ~25 the machine gives (see the module docstring)."""
    if not isinstance(flat, types.Array) or flat.ndim != 1:
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        name = "llvm.prefetch.p0" if llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"  # opaque pointers from 15
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]),
                                            name)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(flat, types.intp), codegen


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _matvec_int8(qs, scales, x, out, block_size):
    """qs (N, K) int8, scales (N, K / block_size) float16 bits, x (m, K) float32 -> out (m, N).

    Four weight rows at a time share each load of x. Each row keeps 16 float32 lanes
    across all its blocks: per step of 32 weights, lane j gets scale * (q_j x_j +
    q_{j+16} x_{j+16}) (LLVM vectorises the j loop; the 16 lanes are summed once per
    row, not once per block). The group's 4 rows are 4 K contiguous bytes, read 128
    bytes per step: PREFETCH_AHEAD bytes ahead of that point are asked for in advance.
    The last group of a matrix whose N is not a multiple of 4 repeats its last row
    (computed, not stored) instead of branching.
    """
    n_rows, k = qs.shape
    flat = qs.reshape(-1)  # (N K,) for the prefetch addresses
    m = x.shape[0]
    last = n_rows - 1
    for group in prange((n_rows + 3) // 4):
        r0 = 4 * group
        r1, r2, r3 = min(r0 + 1, last), min(r0 + 2, last), min(r0 + 3, last)
        acc = np.empty((4, HALF_LANES), dtype=np.float32)  # (row of the group, lane)
        for i in range(m):
            acc[:] = 0
            for b in range(k // block_size):
                s0, s1 = _half_to_float32(scales[r0, b]), _half_to_float32(scales[r1, b])
                s2, s3 = _half_to_float32(scales[r2, b]), _half_to_float32(scales[r3, b])
                for p in range(b * block_size, (b + 1) * block_size, LANES):
                    ahead = r0 * k + 4 * p + PREFETCH_AHEAD  # where the group's reading will be
                    if i == 0 and ahead + 64 < flat.size:
                        _prefetch(flat, ahead)
                        _prefetch(flat, ahead + 64)
                    # 1-D views indexed by the loop counter alone (LLVM knows it is >= 0): SIMD loads
                    q0, q1, q2, q3 = qs[r0, p:p + LANES], qs[r1, p:p + LANES], qs[r2, p:p + LANES], qs[r3, p:p + LANES]
                    xv = x[i, p:p + LANES]
                    for j in range(HALF_LANES):  # widen int8 -> float32 in registers, multiply-add
                        xa, xb = xv[j], xv[j + HALF_LANES]
                        acc[0, j] += s0 * (np.float32(q0[j]) * xa + np.float32(q0[j + HALF_LANES]) * xb)
                        acc[1, j] += s1 * (np.float32(q1[j]) * xa + np.float32(q1[j + HALF_LANES]) * xb)
                        acc[2, j] += s2 * (np.float32(q2[j]) * xa + np.float32(q2[j + HALF_LANES]) * xb)
                        acc[3, j] += s3 * (np.float32(q3[j]) * xa + np.float32(q3[j + HALF_LANES]) * xb)
            _store4(out, i, r0, n_rows, acc[0].sum(), acc[1].sum(), acc[2].sum(), acc[3].sum())


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _matvec_int4(qs, scales, x, out, block_size):
    """qs (N, K/2) uint8 nibbles, scales (N, K / block_size) float16 bits, x (m, K) float32 -> out (m, N).

    In a block of B weights, byte j holds weight j (low nibble) and weight j + B/2
    (high nibble); a weight is (nibble - 8) * scale. With v the byte as a float, h =
    floor(v / 16) its high nibble and v - 16 h its low one (float32 arithmetic: Numba
    widens integer nibble arithmetic to int64, 8 lanes instead of 16):
        (low - 8) x_lo + (high - 8) x_hi = v x_lo + h (x_hi - 16 x_lo) - 8 (x_lo + x_hi)
    where the x terms (per lane, shared by the group's 4 rows) are computed once per
    step. Four rows at a time; 16 float32 lanes per row across all its blocks, the
    scale applied lane by lane; 64 bytes of the group per step, PREFETCH_AHEAD ahead
    asked for in advance (as _matvec_int8).
    """
    n_rows, kb = qs.shape
    flat = qs.reshape(-1)  # (N K/2,) for the prefetch addresses
    m = x.shape[0]
    half = block_size // 2
    last = n_rows - 1
    for group in prange((n_rows + 3) // 4):
        r0 = 4 * group
        r1, r2, r3 = min(r0 + 1, last), min(r0 + 2, last), min(r0 + 3, last)
        acc = np.empty((4, HALF_LANES), dtype=np.float32)  # (row of the group, lane)
        for i in range(m):
            acc[:] = 0
            for b in range(2 * kb // block_size):
                s0, s1 = _half_to_float32(scales[r0, b]), _half_to_float32(scales[r1, b])
                s2, s3 = _half_to_float32(scales[r2, b]), _half_to_float32(scales[r3, b])
                for p in range(b * half, (b + 1) * half, HALF_LANES):  # 16 bytes = 32 weights per step
                    ahead = r0 * kb + 4 * p + PREFETCH_AHEAD
                    if i == 0 and ahead < flat.size:
                        _prefetch(flat, ahead)
                    kx = p + b * half  # x index of the low nibbles: block start + (p - block's first byte)
                    xl, xh = x[i, kx:kx + HALF_LANES], x[i, kx + half:kx + half + HALF_LANES]
                    q0, q1 = qs[r0, p:p + HALF_LANES], qs[r1, p:p + HALF_LANES]
                    q2, q3 = qs[r2, p:p + HALF_LANES], qs[r3, p:p + HALF_LANES]
                    for j in range(HALF_LANES):
                        a, c = xl[j], xh[j]
                        e = np.float32(8) * (a + c)
                        acc[0, j] += s0 * (_nibbles_dot(q0[j], a, c) - e)
                        acc[1, j] += s1 * (_nibbles_dot(q1[j], a, c) - e)
                        acc[2, j] += s2 * (_nibbles_dot(q2[j], a, c) - e)
                        acc[3, j] += s3 * (_nibbles_dot(q3[j], a, c) - e)
            _store4(out, i, r0, n_rows, acc[0].sum(), acc[1].sum(), acc[2].sum(), acc[3].sum())


@njit(inline="always")
def _nibbles_dot(byte, x_low, x_high):
    """low nibble * x_low + high nibble * x_high, the nibbles split in float32.

    Numba widens integer arithmetic to int64, which LLVM then vectorises 8 lanes at a
    time; in float32 (exact for 0..255) it runs 16 lanes: high = floor(byte / 16),
    low = byte - 16 high.
    """
    v = np.float32(byte)
    high = np.floor(v * np.float32(0.0625))
    return (v - np.float32(16) * high) * x_low + high * x_high


@njit(inline="always")
def _store4(out, i, r0, n_rows, t0, t1, t2, t3):
    out[i, r0] = t0
    if r0 + 1 < n_rows:
        out[i, r0 + 1] = t1
    if r0 + 2 < n_rows:
        out[i, r0 + 2] = t2
    if r0 + 3 < n_rows:
        out[i, r0 + 3] = t3


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _dequantize_int8(qs, scales, r0, out, block_size):
    """Rows r0 .. r0 + len(out) of an int8 matrix into out (rows, K) float32."""
    for r in prange(out.shape[0]):
        for b in range(out.shape[1] // block_size):
            s = _half_to_float32(scales[r0 + r, b])
            src, dst = qs[r0 + r, b * block_size:(b + 1) * block_size], out[r, b * block_size:(b + 1) * block_size]
            for j in range(block_size):
                dst[j] = s * np.float32(src[j])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _dequantize_int4(qs, scales, r0, out, block_size):
    """Rows r0 .. r0 + len(out) of an int4 matrix into out (rows, K) float32."""
    half = block_size // 2
    for r in prange(out.shape[0]):
        for blk in range(out.shape[1] // block_size):
            s = _half_to_float32(scales[r0 + r, blk])
            for j in range(half):
                v = np.int32(qs[r0 + r, blk * half + j])
                out[r, blk * block_size + j] = s * np.float32((v & 15) - 8)
                out[r, blk * block_size + half + j] = s * np.float32((v >> 4) - 8)


_DEQUANTIZE = {"int8": _dequantize_int8, "int4": _dequantize_int4}
# The same matvec cores without threads, for small products (see PARALLEL_MIN)
_matvec_int8_serial = njit(fastmath=FASTMATH, cache=True)(_matvec_int8.py_func)
_matvec_int4_serial = njit(fastmath=FASTMATH, cache=True)(_matvec_int4.py_func)
_MATVEC = {("int8", False): _matvec_int8, ("int8", True): _matvec_int8_serial,  # (scheme, serial)
           ("int4", False): _matvec_int4, ("int4", True): _matvec_int4_serial}


def supports(weight, x) -> bool:
    """Whether these kernels take this call (float32 input; anything else goes to the NumPy path)."""
    return x.dtype == np.float32 and isinstance(x, np.ndarray) and weight.block_size % LANES == 0


def linear(weight, x):
    """x (..., K) float32 @ weight.T -> (..., N): matvec for a few rows, tiled matmul for many."""
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = np.ascontiguousarray(x.reshape(-1, k))  # (m, K)
    m = x2.shape[0]
    scales = weight.scales.view(np.uint16)
    out = np.empty((m, n), dtype=np.float32)  # (m, N)
    if m <= MATVEC_MAX_ROWS:
        serial = m * n * k < PARALLEL_MIN
        _MATVEC[weight.scheme, serial](weight.qs, scales, x2, out, weight.block_size)
    else:
        dequantize = _DEQUANTIZE[weight.scheme]
        rows = max(16, min(n, TILE_BYTES // (4 * k)))
        tile = np.empty((rows, k), dtype=np.float32)  # the one float buffer, reused by every tile
        for r0 in range(0, n, rows):
            t = tile[:min(rows, n - r0)]  # (rows, K)
            dequantize(weight.qs, scales, r0, t, weight.block_size)
            # (m, rows) into its columns of out, BLAS. NOTE: not (rows, m) then a transpose of the whole
            # output: that copy took longer than the product (17.7 vs 7.0 ms for in_proj at 512 tokens).
            np.matmul(x2, t.T, out=out[:, r0:r0 + t.shape[0]])
    return out.reshape(*lead, n)
