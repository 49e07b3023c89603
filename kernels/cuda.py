"""Numba CUDA kernels for Mamba's hot functions: the version of each that the library runs.

Each public function takes the arguments of its readable twin in `minimamba.ops`
and gives the same result; tests/gpu compares them (under the CUDA simulator on
any machine, on a real GPU when one is there). Other versions of these kernels,
and the measured figures of every version, live in the kernel lab, kernels/lab/
(one numbered file per op, each a script that checks and times its versions).

    here                     readable twin (minimamba.ops)   parallel over (b batch, d channels, l length, n state)
    selective_scan_fn        selective_scan_ref / _fn        v1 for l <= 64 or b * d >= V1_MIN_ROWS, else chunked:
      v1  (lab scan 1)                                       one thread per (b, channel) walks l, the n states in
                                                             registers (the paper's hardware-aware scan, Sec. 3.3.2)
      chunked (lab scan 2)                                   three launches: chunk_state, one thread per (b, chunk,
                                                             channel), the chunk's end state from 0 and its summed
                                                             delta; chunk_carry, one per (b, state, channel), the
                                                             states entering each chunk; chunk_output, one per
                                                             (b, chunk, channel), reruns its chunk and writes y
    selective_state_update   selective_state_update          one thread per (b, channel), loop over n, state in place
    causal_conv1d_fn         causal_conv1d_fn                one thread per (b, position, channel)
    causal_conv1d_update     causal_conv1d_update            l == 1: one thread per (b, channel), output and shift
                                                             fused; l > 1: conv_fwd from the state, then conv_shift
    linear  (lab linear 1)   linear                          one block per output feature, threads over the input
                                                             width, shared-memory tree sum (no cuBLAS: see
                                                             cuda_graph.py, which captures the decode step)

Launch cost: numba-cuda 0.30 spends ~15 us per array argument per launch (145 us
for selective_state_update's ten), so eager decode is launch-bound; the CUDA
graph of kernels.cuda_graph removes it (batch 1: 49 -> 705 tokens/s on an H200).

Kernels use plain `cuda.jit`, local and shared arrays, syncthreads, inlined device
functions and the 1-D grid only (no warp shuffles), so they run under the simulator
and move to another CUDA Python front end by an import change. Kernels are built per
(state size n, dtype) by a factory so the loops over n have a compile-time trip count
(unrolled, the state stays in registers) and float literals carry the kernel's dtype.

Arrays: CuPy arrays pass zero-copy through __cuda_array_interface__; NumPy
arrays are refused (they would be copied to the GPU and back at every launch),
except under the simulator (NUMBA_ENABLE_CUDASIM=1), where NumPy is the device.
Kernels launch on CuPy's current stream, so they order with CuPy's own work and
are captured by CuPy stream capture (CUDA graphs).
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np

try:
    from numba import cuda
    import numba
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("minimamba.kernels.cuda needs numba-cuda: pip install 'minimamba[gpu]' "
                      "(or 'minimamba[gpu-cuda13]' for CUDA 13)") from err

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

    def chunk_thread(u, B, C, nchunks):
        """(batch row, chunk, channel, group of B, group of C) of this thread of a (b, chunk, channel) launch.

        Channels fastest (consecutive threads read consecutive channels: coalesced in the (b, l, d) layouts),
        then chunks, then batch rows; a thread past the end gets a batch row >= b and must return.
        """
        idx = cuda.grid(1)
        d = u.shape[1]
        c = idx % d
        rest = idx // d
        return rest // nchunks, rest % nchunks, c, c // (d // B.shape[1]), c // (d // C.shape[1])

    place = _device(chunk_thread, dtype)

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
        nb, d, l = u.shape
        bi, j, c, gb, _ = place(u, B, B, chunk_dt.shape[1])
        if bi >= nb:
            return
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
        nb, d, l = u.shape
        nchunks = chunk_h.shape[1]
        bi, j, c, gb, gc = place(u, B, C, nchunks)
        if bi >= nb:
            return
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


def signature_types(dtype):
    """(void, int64, 1-D ... 4-D arrays of dtype in any layout): the words of a kernel signature."""
    f = numba.from_dtype(np.dtype(dtype))
    return (numba.void, numba.int64) + tuple(numba.types.Array(f, ndim, "A") for ndim in (1, 2, 3, 4))


def kernel_signatures(dtype):
    """Explicit numba signatures of every kernel here for one float dtype (arrays in any layout)."""
    v, i, a1, a2, a3, a4 = signature_types(dtype)
    return dict(
        scan_v1=v(a3, a3, a2, a4, a4, a1, a3, a1, a3, a3, a3, i, i, i, i, i),
        chunk_state=v(a3, a3, a2, a4, a1, a4, a3, i, i, i),
        chunk_carry=v(a2, a3, a4, a3, i),
        chunk_output=v(a3, a3, a2, a4, a4, a1, a3, a1, a4, a3, a3, i, i, i, i, i),
        state_update=v(a3, a2, a2, a2, a3, a3, a1, a2, a1, a2, i, i, i, i),
        conv_fwd=v(a3, a3, a2, a1, a3, i, i, i),
        conv_shift=v(a3, a3),
        conv_step=v(a2, a3, a2, a1, a2, i, i),
        linear=v(a2, a2, a2, i),
    )


def kernel_functions(n, dtype):
    """The Python functions of every kernel here for state size n and one dtype (for compile checks)."""
    return {**_scan_functions(n, dtype), **_update_functions(n, dtype), **_conv_functions(dtype),
            **_linear_functions(LINEAR_ROWS[-1], dtype)}


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


# ---------------------------------------------------------------- selective_scan_fn   (twin: ops.selective_scan_fn)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, initial_state=None, chunk_size=None, version=None):
    """The selective scan on the GPU; arguments and result as `minimamba.ops.selective_scan_ref`.

    Extra keywords: `version` "v1" or "chunked" (None: v1 for short prompts or many rows,
    else chunked; see the module docstring); `chunk_size` the chunk of l of chunked (None:
    enough chunks to fill the GPU). The output is a (b, d, l) view of a (b, l, d) array,
    the layout the model reads next.
    """
    s = scan_arguments("selective_scan_fn", u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
    if version is None:
        version = "v1" if (s.b * s.d >= V1_MIN_ROWS or s.l <= 4 * MIN_CHUNK) else "chunked"
    if version not in ("v1", "chunked"):
        raise ValueError(f"version must be None, 'v1' or 'chunked', got {version!r} "
                         "(the other versions are in kernels/lab/scan.py)")
    if s.l == 0:  # nothing to scan (and no zero-size arrays handed to a launch): the state passes through
        s.last_state[...] = 0 if initial_state is None else initial_state
    elif version == "v1":
        _scan_v1(s)
    else:
        _scan_chunked(s, chunk_size)
    return scan_result(s, u.dtype, return_last_state)


def scan_arguments(func, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    """The scan's arguments checked, cast to the compute dtype and made kernel arguments, with the outputs.

    Every version of the scan (here and in kernels/lab/scan.py) starts from this namespace: b, d, l, n;
    xp, ct (the compute dtype); u, delta, A, B4, C4 (cast; B and C as (b, g, n, l)); D, z, bias, init (kernel
    arguments, a placeholder when absent) with their flags has_D, has_z, has_bias, has_init; softplus;
    out (b, d, l) and last_state (b, d, n) to fill.
    """
    for name, array in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                        ("delta_bias", delta_bias), ("initial_state", initial_state)):
        if array is not None:
            _check_array(func, name, array)
    b, d, l, n = check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    xp = array_module(u)
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    s = SimpleNamespace(b=b, d=d, l=l, n=n, xp=xp, ct=ct, softplus=int(bool(delta_softplus)))
    s.u, s.delta, s.A = (x.astype(ct, copy=False) for x in (u, delta, A))
    s.B4 = _groups4(B.astype(ct, copy=False), b, d, n, l, xp)  # (b, g, n, l)
    s.C4 = _groups4(C.astype(ct, copy=False), b, d, n, l, xp)
    s.D, s.has_D = _opt(xp, D, ct, 1)
    s.z, s.has_z = _opt(xp, z, ct, 3)
    s.bias, s.has_bias = _opt(xp, delta_bias, ct, 1)
    s.init, s.has_init = _opt(xp, initial_state, ct, 3)
    s.out = xp.empty((b, l, d), dtype=ct).transpose(0, 2, 1)  # (b, d, l), channels contiguous
    s.last_state = xp.empty((b, d, n), dtype=ct)
    return s


def scan_result(s, dtype, return_last_state):
    out = _finish_dtype(s.out, dtype)
    return (out, s.last_state) if return_last_state else out


def _scan_v1(s):
    _launch("scan_v1", s.n, s.ct, s.b * s.d, _arg(s.u), _arg(s.delta), _arg(s.A), _arg(s.B4), _arg(s.C4), s.D, s.z,
            s.bias, s.init, _arg(s.out), _arg(s.last_state), s.has_D, s.has_z, s.has_bias, s.softplus, s.has_init)


def _scan_chunked(s, chunk_size):
    b, d, l, n, ct = s.b, s.d, s.l, s.n, s.ct
    if chunk_size is None:
        nchunks = max(1, min(-(-CHUNK_TARGET_THREADS // (b * d)), -(-l // MIN_CHUNK)))
        chunk_size = -(-l // nchunks)
    chunk_size = positive_chunk_size(chunk_size)
    nchunks = -(-l // chunk_size)
    chunk_h = s.xp.empty((b, nchunks, n, d), dtype=ct)  # end states, then states entering each chunk
    chunk_dt = s.xp.empty((b, nchunks, d), dtype=ct)  # sum of delta over each chunk
    a_u, a_delta, a_A, a_B = _arg(s.u), _arg(s.delta), _arg(s.A), _arg(s.B4)
    a_h, a_dt = _arg(chunk_h), _arg(chunk_dt)
    _launch("chunk_state", n, ct, b * nchunks * d, a_u, a_delta, a_A, a_B, s.bias, a_h, a_dt,
            chunk_size, s.has_bias, s.softplus)
    _launch("chunk_carry", n, ct, b * n * d, a_A, s.init, a_h, a_dt, s.has_init)
    _launch("chunk_output", n, ct, b * nchunks * d, a_u, a_delta, a_A, a_B, _arg(s.C4), s.D, s.z, s.bias, a_h,
            _arg(s.out), _arg(s.last_state), chunk_size, s.has_D, s.has_z, s.has_bias, s.softplus)


def positive_chunk_size(chunk_size):
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


# ---------------------------------------------------- selective_state_update   (twin: ops.selective_state_update)


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


# -------------------------------------------- causal_conv1d_fn, causal_conv1d_update   (twins: ops, same names)


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


# ------------------------------------------------------ linear   (twin: ops.linear; for the captured decode step)


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


def linear(x, weight, bias=None):
    """x @ weight.T (+ bias) without cuBLAS (so that CuPy lets a CUDA graph capture it); as `minimamba.ops.linear`.

    Args: x (b, k), any strides; weight (o, k); bias (o,) or None. Returns (b, o). Built for
    decode steps (small b): one block per output feature, each weight element read once per
    launch of up to 64 rows. (Lab: kernels/lab/linear.py, version 1; version 2 is tiled.)
    """
    return linear_with(_linear_v1, x, weight, bias)


def linear_with(version, x, weight, bias):
    """x @ weight.T (+ bias) by `version(xc, a_w, out, ct)`, which fills out (b, o) from x (b, k) cast to ct
    and the weight as a kernel argument; the checks, the empty cases and the bias are done here once for
    every version (here and in kernels/lab/linear.py)."""
    for name, array in (("x", x), ("weight", weight), ("bias", bias)):
        if array is not None:
            _check_array("linear", name, array)
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear: x has shape {tuple(x.shape)} and weight {tuple(weight.shape)}; "
                         "expected (b, k) and (o, k)")
    check_shape("bias", bias, (weight.shape[0],))
    xp = array_module(x)
    ct = compute_dtype(x, weight)
    b, o = x.shape[0], weight.shape[0]
    out = xp.empty((b, o), dtype=ct)
    if 0 in (b, o, weight.shape[1]):  # nothing to compute, or an empty sum: no zero-size launch
        out[...] = 0
    else:
        version(x.astype(ct, copy=False), _arg(weight.astype(ct, copy=False)), out, ct)
    if bias is not None:
        out += bias.astype(ct, copy=False)
    return out


def _linear_v1(xc, a_w, out, ct):
    if THREADS > 128 or THREADS & (THREADS - 1):
        raise ValueError(f"linear needs THREADS to be a power of two <= 128, got {THREADS}")
    b, o = out.shape
    for start in range(0, b, LINEAR_ROWS[-1]):
        rows = min(b - start, LINEAR_ROWS[-1])
        bucket = next(size for size in LINEAR_ROWS if size >= rows)
        kernel = _linear_kernel(bucket, ct.name)
        kernel[o, THREADS, _stream()](_arg(xc[start:start + rows]), a_w, _arg(out[start:start + rows]), rows)
