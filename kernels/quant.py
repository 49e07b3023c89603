"""Numba CPU kernels that multiply straight from packed int8 / int4 weights.

The readable twin is `minimamba.quant.QuantizedWeight.linear` with the NumPy path
(dequantize the matrix, then `x @ W.T`); tests/test_quant.py compares them. The
formats are llama.cpp's Q8_0 and Q4_0 blocks (see minimamba/quant.py): per row of
K weights, K / block_size float16 scales and the packed integers.

Versions, and what each parallelises over:

    matvec       v2  x (m, K) with m <= MATVEC_MAX_ROWS (decode: m = batch): prange over
                     groups of 4 output rows, which share each load of x; the integers
                     are widened to float32 in registers. int8 sums each group of 32
                     products, then multiplies by the block's scale; int4 keeps 16 lanes
                     per row across all blocks (scale applied per lane, the -8 offset taken
                     out as 8 * the block's sum of x) and sums them once per row. The 4
                     rows' bytes (a few KB) stay in L1 while the m inputs pass over them,
                     so every weight byte comes from memory once per call, whatever m is.
                     No float copy of the matrix exists. (v1, 32 lanes per row, the scale
                     inside the loop, integer nibble arithmetic - which Numba widens to
                     int64, 8 lanes - and indices LLVM could not prove >= 0, which made
                     gathers: int4 ran at a quarter of v2's speed, int8 at three quarters.)
    matmul       v1  x (m, K) with m > MATVEC_MAX_ROWS (prefill): the matrix is walked in
                     tiles of rows; each tile is dequantized into one float buffer
                     (prange over its rows) and multiplied by NumPy's BLAS (tile @ x.T into
                     a contiguous slab of the transposed output, transposed back once at
                     the end). The buffer is TILE_BYTES (16 MB), reused for every tile, so
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
from numba import njit, prange, types
from numba.extending import intrinsic

FASTMATH = {"contract", "reassoc", "nsz", "arcp"}  # as kernels/cpu.py: NaN and inf still propagate
LANES = 32  # integers per accumulation group (the smallest block size); a fixed trip count LLVM vectorises
HALF_LANES = LANES // 2  # int4: bytes per step (32 weights)
MATVEC_MAX_ROWS = 8  # inputs up to this many rows (decode batch) use matvec, more use the tiled matmul
# Below this many multiply-adds a matvec runs on the calling thread: x_proj of the 130m shape
# (80 x 1536) took 0.22 ms per call with the thread pool on the shared machine, for ~25 us of work.
PARALLEL_MIN = 1 << 19
TILE_BYTES = 16 << 20  # float32 bytes of one dequantized tile in the matmul (see matmul above)


@intrinsic
def _half_to_float32(typingctx, bits):
    """float16 bits (uint16) -> float32, exactly: reinterpret as half, then widen."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _matvec_int8(qs, scales, x, out, block_size):
    """qs (N, K) int8, scales (N, K / block_size) float16 bits, x (m, K) float32 -> out (m, N).

    Four weight rows at a time share each load of x; per group of LANES weights, four
    float32 sums (LLVM vectorises the j loop), each then times its block's scale. The
    last group of a matrix whose N is not a multiple of 4 repeats its last row (computed,
    not stored) instead of branching.
    """
    n_rows, k = qs.shape
    m = x.shape[0]
    per_block = block_size // LANES
    last = n_rows - 1
    for group in prange((n_rows + 3) // 4):
        r0 = 4 * group
        r1, r2, r3 = min(r0 + 1, last), min(r0 + 2, last), min(r0 + 3, last)
        for i in range(m):
            t0 = t1 = t2 = t3 = np.float32(0)
            for g in range(k // LANES):
                k0 = g * LANES
                a0 = a1 = a2 = a3 = np.float32(0)
                for j in range(LANES):  # widen int8 -> float32 in registers, multiply-add
                    xv = x[i, k0 + j]
                    a0 += np.float32(qs[r0, k0 + j]) * xv
                    a1 += np.float32(qs[r1, k0 + j]) * xv
                    a2 += np.float32(qs[r2, k0 + j]) * xv
                    a3 += np.float32(qs[r3, k0 + j]) * xv
                b = g // per_block
                t0 += _half_to_float32(scales[r0, b]) * a0
                t1 += _half_to_float32(scales[r1, b]) * a1
                t2 += _half_to_float32(scales[r2, b]) * a2
                t3 += _half_to_float32(scales[r3, b]) * a3
            _store4(out, i, r0, n_rows, t0, t1, t2, t3)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _matvec_int4(qs, scales, x, x_block_sums, out, block_size):
    """qs (N, K/2) uint8 nibbles, scales (N, K / block_size) float16 bits, x (m, K) float32 -> out (m, N).

    In a block of B weights, byte j holds weight j (low nibble) and weight j + B/2
    (high nibble); a weight is (nibble - 8) * scale. The -8 is taken out of the loop:
    sum_j (q_j - 8) x_j = sum_j q_j x_j - 8 * sum_j x_j, with the block sums of x
    (x_block_sums (m, K / B)) computed once per call. Four rows at a time share each
    load of x; each row keeps 16 float32 lanes across all its blocks (the scale is
    applied lane by lane), so the lanes are summed once per row, not once per block.
    """
    n_rows, k = qs.shape[0], 2 * qs.shape[1]
    m = x.shape[0]
    half = block_size // 2
    last = n_rows - 1
    eight = np.float32(8)
    for group in prange((n_rows + 3) // 4):
        r0 = 4 * group
        r1, r2, r3 = min(r0 + 1, last), min(r0 + 2, last), min(r0 + 3, last)
        acc = np.zeros((m, 4, HALF_LANES), dtype=np.float32)
        offset = np.zeros((m, 4), dtype=np.float32)
        for b in range(k // block_size):
            s0, s1 = _half_to_float32(scales[r0, b]), _half_to_float32(scales[r1, b])
            s2, s3 = _half_to_float32(scales[r2, b]), _half_to_float32(scales[r3, b])
            for i in range(m):
                xs = eight * x_block_sums[i, b]
                offset[i, 0] += s0 * xs
                offset[i, 1] += s1 * xs
                offset[i, 2] += s2 * xs
                offset[i, 3] += s3 * xs
            for p in range(b * half, (b + 1) * half, HALF_LANES):  # 16 bytes = 32 weights per step
                kx = p + b * half  # x index of the low nibbles: block start + (p - block's first byte)
                # 1-D views indexed by the loop counter alone (LLVM knows it is >= 0): SIMD loads, no gathers
                q0, q1 = qs[r0, p:p + HALF_LANES], qs[r1, p:p + HALF_LANES]
                q2, q3 = qs[r2, p:p + HALF_LANES], qs[r3, p:p + HALF_LANES]
                for i in range(m):
                    xl, xh = x[i, kx:kx + HALF_LANES], x[i, kx + half:kx + half + HALF_LANES]
                    for j in range(HALF_LANES):
                        acc[i, 0, j] += s0 * _nibbles_dot(q0[j], xl[j], xh[j])
                        acc[i, 1, j] += s1 * _nibbles_dot(q1[j], xl[j], xh[j])
                        acc[i, 2, j] += s2 * _nibbles_dot(q2[j], xl[j], xh[j])
                        acc[i, 3, j] += s3 * _nibbles_dot(q3[j], xl[j], xh[j])
        for i in range(m):
            _store4(out, i, r0, n_rows, acc[i, 0].sum() - offset[i, 0], acc[i, 1].sum() - offset[i, 1],
                    acc[i, 2].sum() - offset[i, 2], acc[i, 3].sum() - offset[i, 3])


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
    if m <= MATVEC_MAX_ROWS:
        out = np.empty((m, n), dtype=np.float32)  # (m, N)
    serial = m * n * k < PARALLEL_MIN
    if m <= MATVEC_MAX_ROWS and weight.scheme == "int8":
        (_matvec_int8_serial if serial else _matvec_int8)(weight.qs, scales, x2, out, weight.block_size)
    elif m <= MATVEC_MAX_ROWS:
        sums = x2.reshape(m, k // weight.block_size, weight.block_size).sum(axis=-1)  # (m, K/B)
        (_matvec_int4_serial if serial else _matvec_int4)(weight.qs, scales, x2, sums, out, weight.block_size)
    else:
        dequantize = _DEQUANTIZE[weight.scheme]
        rows = max(16, min(n, TILE_BYTES // (4 * k)))
        tile = np.empty((rows, k), dtype=np.float32)  # the one float buffer, reused by every tile
        out_t = np.empty((n, m), dtype=np.float32)  # (N, m): each tile's product is a contiguous slab
        for r0 in range(0, n, rows):
            t = tile[:min(rows, n - r0)]  # (rows, K)
            dequantize(weight.qs, scales, r0, t, weight.block_size)
            np.matmul(t, x2.T, out=out_t[r0:r0 + t.shape[0]])  # (rows, m), BLAS
        out = np.ascontiguousarray(out_t.T)  # (m, N)
    return out.reshape(*lead, n)
