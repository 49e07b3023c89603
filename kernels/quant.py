"""Numba CPU kernels that multiply straight from packed int8 / int4 weights.

The readable twin is `minimamba.quant.QuantizedWeight.linear` with the NumPy path
(dequantize the matrix, then `x @ W.T`); tests/test_quant.py compares them. The
formats are llama.cpp's Q8_0 and Q4_0 blocks (see minimamba/quant.py): per row of
K weights, K / block_size float16 scales and the packed integers.

Versions, and what each parallelises over:

    matvec       v1  x (m, K) with m <= MATVEC_MAX_ROWS (decode: m = batch): prange over
                     chunks of ROWS output rows; per weight row, each 32-wide group of
                     integers is widened to float32 in registers, multiplied by its scale
                     and accumulated in 32 lanes for each of the m inputs, so every weight
                     byte is read from memory once per call, whatever m is. No float copy
                     of the matrix exists.
    matmul       v1  x (m, K) with m > MATVEC_MAX_ROWS (prefill): the matrix is walked in
                     tiles of TILE_ROWS rows; each tile is dequantized into one small float
                     buffer (prange over its rows) and multiplied by NumPy's BLAS (x @ tile.T
                     into the output's columns). The buffer is TILE_ROWS x K floats (~1 MB),
                     reused for every tile, so the float copy never exceeds one tile.

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
ROWS = 16  # weight rows per prange work item
MATVEC_MAX_ROWS = 8  # inputs up to this many rows (decode batch) use matvec, more use the tiled matmul
TILE_BYTES = 1 << 20  # float32 bytes of one dequantized tile in the matmul


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
    """qs (N, K) int8, scales (N, K / block_size) float16 bits, x (m, K) float32 -> out (m, N)."""
    n_rows, k = qs.shape
    m = x.shape[0]
    per_block = block_size // LANES
    for chunk in prange((n_rows + ROWS - 1) // ROWS):
        acc = np.empty((m, LANES), dtype=np.float32)
        for row in range(chunk * ROWS, min(n_rows, chunk * ROWS + ROWS)):
            acc[:] = 0
            for g in range(k // LANES):
                s = _half_to_float32(scales[row, g // per_block])
                k0 = g * LANES
                for i in range(m):
                    for j in range(LANES):  # widen, scale, multiply-add: 32 lanes
                        acc[i, j] += (s * np.float32(qs[row, k0 + j])) * x[i, k0 + j]
            for i in range(m):
                out[i, row] = acc[i].sum()


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _matvec_int4(qs, scales, x, out, block_size):
    """qs (N, K/2) uint8 nibbles, scales (N, K / block_size) float16 bits, x (m, K) float32 -> out (m, N).

    In a block of B weights, byte j holds weight j (low nibble) and weight j + B/2
    (high nibble); a weight is (nibble - 8) * scale.
    """
    n_rows, k = qs.shape[0], 2 * qs.shape[1]
    m = x.shape[0]
    half = block_size // 2
    lanes = LANES // 2  # bytes per group: 16 bytes hold 32 weights
    for chunk in prange((n_rows + ROWS - 1) // ROWS):
        acc = np.empty((m, lanes), dtype=np.float32)
        for row in range(chunk * ROWS, min(n_rows, chunk * ROWS + ROWS)):
            acc[:] = 0
            for blk in range(k // block_size):
                s = _half_to_float32(scales[row, blk])
                k0 = blk * block_size
                p0 = blk * half
                for j0 in range(0, half, lanes):
                    for i in range(m):
                        for j in range(lanes):
                            v = np.int32(qs[row, p0 + j0 + j])
                            lo = np.float32((v & 15) - 8)
                            hi = np.float32((v >> 4) - 8)
                            acc[i, j] += s * (lo * x[i, k0 + j0 + j] + hi * x[i, k0 + half + j0 + j])
            for i in range(m):
                out[i, row] = acc[i].sum()


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _dequantize_int8(qs, scales, r0, out, block_size):
    """Rows r0 .. r0 + len(out) of an int8 matrix into out (rows, K) float32."""
    for r in prange(out.shape[0]):
        for c in range(out.shape[1]):
            out[r, c] = _half_to_float32(scales[r0 + r, c // block_size]) * np.float32(qs[r0 + r, c])


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


_MATVEC = {"int8": _matvec_int8, "int4": _matvec_int4}
_DEQUANTIZE = {"int8": _dequantize_int8, "int4": _dequantize_int4}


def supports(weight, x) -> bool:
    """Whether these kernels take this call (float32 input; anything else goes to the NumPy path)."""
    return x.dtype == np.float32 and isinstance(x, np.ndarray) and weight.block_size % LANES == 0


def linear(weight, x):
    """x (..., K) float32 @ weight.T -> (..., N): matvec for a few rows, tiled matmul for many."""
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = np.ascontiguousarray(x.reshape(-1, k))  # (m, K)
    m = x2.shape[0]
    out = np.empty((m, n), dtype=np.float32)  # (m, N)
    scales = weight.scales.view(np.uint16)
    if m <= MATVEC_MAX_ROWS:
        _MATVEC[weight.scheme](weight.qs, scales, x2, out, weight.block_size)
    else:
        dequantize = _DEQUANTIZE[weight.scheme]
        rows = max(16, min(n, TILE_BYTES // (4 * k)))
        tile = np.empty((rows, k), dtype=np.float32)  # the one float buffer, reused by every tile
        for r0 in range(0, n, rows):
            t = tile[:min(rows, n - r0)]  # (rows, K)
            dequantize(weight.qs, scales, r0, t, weight.block_size)
            np.matmul(x2, t.T, out=out[:, r0:r0 + t.shape[0]])  # (m, rows)
    return out.reshape(*lead, n)
