"""The functional layer: NumPy twins of the kernels Mamba runs on.

Every function takes the argument names, layouts and semantics of the CUDA
function it mirrors, so a kernel author can feed it the very arrays they feed
mamba_ssm or causal-conv1d:

    selective_scan_fn       mamba_ssm.ops.selective_scan_interface.selective_scan_fn
    selective_scan_ref      mamba_ssm.ops.selective_scan_interface.selective_scan_ref
    selective_state_update  mamba_ssm.ops.triton.selective_state_update.selective_state_update
    causal_conv1d_fn        causal_conv1d.causal_conv1d_fn
    causal_conv1d_update    causal_conv1d.causal_conv1d_update

Dimension names (paper symbols in brackets):
    b  batch                  l  sequence length (L)
    d  channels (D, the mixer's inner width e in the model)
    n  state size (N)         k  conv width
    g  groups of channels that share B and C (1 for Mamba-1 checkpoints)

Arithmetic happens in float32, or float64 when any input is float64 (the
ground-truth mode); outputs come back in the dtype of `u` / `x`, as the CUDA
kernels return them. States are float32 (float64 in float64 mode).

Works on NumPy arrays and, unchanged, on CuPy arrays: the array module comes
from the arguments.
"""

from __future__ import annotations

import numpy as np


def array_module(x):
    """numpy for NumPy arrays, cupy for CuPy arrays (imported only when seen)."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def compute_dtype(*arrays):
    """float64 if any input is float64, else float32 (fp16 and bf16 are widened)."""
    if any(a is not None and a.dtype == np.float64 for a in arrays):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def check_shape(name, array, expected):
    """Raise a ValueError that names the argument and both shapes."""
    if array is None:
        return
    shape = tuple(array.shape)
    if shape != tuple(expected):
        raise ValueError(f"{name} has shape {shape}, expected {tuple(expected)}")


# ---------------------------------------------------------------- activations


def silu(x):
    """x * sigmoid(x), written to stay finite for large |x|."""
    xp = array_module(x)
    with np.errstate(over="ignore"):  # exp(-x) = inf for x << 0 gives x / inf = -0, the right limit
        return x / (1 + xp.exp(-x))


def softplus(x, threshold=20.0):
    """log(1 + e^x); x itself above `threshold`, as torch.nn.functional.softplus does.

    NOTE: the references (torch and the mamba_ssm kernels) return x unchanged
    for x > 20; below it log1p(exp(x)) is exact to float precision.
    """
    xp = array_module(x)
    return xp.where(x > threshold, x, xp.log1p(xp.exp(xp.minimum(x, threshold))))


def rms_norm(x, weight, eps=1e-5):
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight.

    Normalises in float32 or better (float64 stays float64), like transformers'
    MambaRMSNorm, and returns the dtype of `weight`'s computation: float32 or
    float64.
    """
    check_norm_args(x, weight)
    ct = compute_dtype(x, weight)
    x = x.astype(ct, copy=False)
    xp = array_module(x)
    variance = (x * x).mean(axis=-1, keepdims=True)
    return x / xp.sqrt(variance + ct.type(eps)) * weight.astype(ct, copy=False)


def linear(x, weight, bias=None):
    """y = x W^T + b, as torch.nn.functional.linear: x (..., in), weight (out, in) -> (..., out).

    `weight` is an array, or an object that multiplies by itself through `weight.linear(x)`
    (a packed quantized matrix, a weight with an unmerged adapter): the model calls this one
    function for every projection, so such weights need no second copy of the forward.
    """
    y = weight.linear(x) if hasattr(weight, "linear") else x @ weight.T
    return y if bias is None else y + bias


def _activation(out, activation):
    if activation is None:
        return out
    if activation in ("silu", "swish"):
        return silu(out)
    raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


# ---------------------------------------------------------------- argument checks
# Shared by these functions and their kernel twins in minimamba.kernels, so every
# implementation refuses bad shapes with the same message.


def check_norm_args(x, weight):
    """rms_norm's arguments: weight (d,) for x (..., d)."""
    if weight.ndim != 1 or x.ndim == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: x has shape {tuple(x.shape)} and weight {tuple(weight.shape)}; "
                         "weight must be (d,) for x of shape (..., d)")


def check_conv_args(x, weight, bias):
    """causal_conv1d_fn's arguments; returns (b, d, l, k)."""
    if x.ndim != 3:
        raise ValueError(f"x must have shape (batch, dim, seqlen), got {tuple(x.shape)}")
    b, d, l = x.shape
    if weight.ndim != 2 or weight.shape[0] != d:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({d}, width)")
    check_shape("bias", bias, (d,))
    return b, d, l, weight.shape[1]


def check_conv_update_args(x, conv_state, weight, bias):
    """causal_conv1d_update's arguments, x already (b, d, l); returns (b, d, l, k)."""
    if x.ndim != 3:
        raise ValueError(f"x must have shape (batch, dim) or (batch, dim, seqlen), got {tuple(x.shape)}")
    b, d, l = x.shape
    if weight.ndim != 2 or weight.shape[0] != d:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({d}, width)")
    k = weight.shape[1]
    if conv_state.ndim != 3 or tuple(conv_state.shape[:2]) != (b, d) or conv_state.shape[2] < k - 1:
        raise ValueError(f"conv_state has shape {tuple(conv_state.shape)}, expected ({b}, {d}, >= {k - 1})")
    check_shape("bias", bias, (d,))
    return b, d, l, k


def check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias):
    """selective_state_update's arguments; returns (b, d, n)."""
    if state.ndim != 3:
        raise ValueError(f"state must have shape (batch, dim, dstate), got {tuple(state.shape)}")
    b, d, n = state.shape
    check_shape("x", x, (b, d))
    check_shape("dt", dt, (b, d))
    check_shape("A", A, (d, n))
    check_shape("D", D, (d,))
    check_shape("z", z, (b, d))
    check_shape("dt_bias", dt_bias, (d,))
    for name, M in (("B", B), ("C", C)):
        if not (tuple(M.shape) == (b, n) or (M.ndim == 3 and M.shape[0] == b and M.shape[2] == n
                                             and d % M.shape[1] == 0)):
            raise ValueError(f"{name} has shape {tuple(M.shape)}, expected ({b}, {n}) or ({b}, groups, {n})")
    return b, d, n


# ---------------------------------------------------------------- causal conv


def causal_conv1d_fn(x, weight, bias=None, activation=None):
    """Causal depthwise conv over the sequence: out[t] = sum_j w[j] x[t - (k-1) + j].

    Args:
        x: (b, d, l)
        weight: (d, k); weight[:, k-1] multiplies the current position
        bias: (d,) or None
        activation: None, "silu" or "swish"
    Returns: (b, d, l), the dtype of x.

    The cross-correlation of torch's Conv1d with padding k-1, keeping the first
    l outputs: position t sees only x[t-k+1 .. t].
    """
    xp = array_module(x)
    b, d, l, k = check_conv_args(x, weight, bias)
    ct = compute_dtype(x, weight)
    x_pad = xp.zeros((b, d, l + k - 1), dtype=ct)  # (b, d, k-1+l): k-1 zeros on the left
    x_pad[:, :, k - 1:] = x
    out = xp.zeros((b, d, l), dtype=ct)  # (b, d, l)
    for j in range(k):
        out += weight[None, :, j:j + 1].astype(ct) * x_pad[:, :, j:j + l]
    if bias is not None:
        out += bias.astype(ct)[None, :, None]
    return _activation(out, activation).astype(x.dtype, copy=False)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """One step (or a few) of the causal conv, reading and writing `conv_state`.

    Args:
        x: (b, d) or (b, d, l): the new pre-conv inputs
        conv_state: (b, d, s) with s >= k - 1: the last s inputs seen; updated in place
        weight: (d, k); bias: (d,) or None; activation: None, "silu" or "swish"
    Returns: the conv output, shape and dtype of x.

    Same result as running causal_conv1d_fn over [everything seen so far, x]
    and keeping the last outputs: the state plays the part of the left padding
    (a zero state is exactly the zero padding of a fresh sequence).
    """
    xp = array_module(x)
    single = x.ndim == 2
    if single:
        x = x[:, :, None]  # (b, d, 1)
    b, d, l, k = check_conv_update_args(x, conv_state, weight, bias)
    s = conv_state.shape[2]
    ct = compute_dtype(x, weight)
    full = xp.concatenate([conv_state.astype(ct), x.astype(ct)], axis=2)  # (b, d, s + l)
    start = s - (k - 1)  # first input the first new output can see
    out = xp.zeros((b, d, l), dtype=ct)
    for j in range(k):
        out += weight[None, :, j:j + 1].astype(ct) * full[:, :, start + j:start + j + l]
    if bias is not None:
        out += bias.astype(ct)[None, :, None]
    conv_state[...] = full[:, :, -s:]
    out = _activation(out, activation).astype(x.dtype, copy=False)
    return out[:, :, 0] if single else out


# ---------------------------------------------------------------- selective scan


def check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state):
    if u.ndim != 3:
        raise ValueError(f"u must have shape (batch, dim, seqlen), got {tuple(u.shape)}")
    b, d, l = u.shape
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"A has shape {tuple(A.shape)}, expected ({d}, dstate)")
    if np.iscomplexobj(A):
        raise ValueError("complex A is not supported (Mamba-1 checkpoints use real A)")
    n = A.shape[1]
    check_shape("delta", delta, (b, d, l))
    check_shape("D", D, (d,))
    check_shape("z", z, (b, d, l))
    check_shape("delta_bias", delta_bias, (d,))
    check_shape("initial_state", initial_state, (b, d, n))
    for name, M in (("B", B), ("C", C)):
        ok = (M.shape == (d, n) or M.shape == (b, n, l)
              or (M.ndim == 4 and M.shape[0] == b and M.shape[2:] == (n, l) and d % M.shape[1] == 0))
        if not ok:
            raise ValueError(f"{name} has shape {tuple(M.shape)}, expected ({d}, {n}), ({b}, {n}, {l}) "
                             f"or ({b}, groups, {n}, {l}) with groups dividing {d}")
    return b, d, l, n


def _per_channel(M, d, l, ct):
    """B or C as an array that broadcasts against (b, d, n, l).

    (d, n) is input-independent (S4), (b, n, l) is selective (Mamba: one B_t
    shared by all channels), (b, g, n, l) gives each group of d/g channels its own.
    """
    xp = array_module(M)
    M = M.astype(ct, copy=False)
    if M.ndim == 2:  # the same B at every time step: repeat it (a view) so [..., t] works for any t
        return xp.broadcast_to(M[None, :, :, None], (1,) + M.shape + (l,))  # (1, d, n, l)
    if M.ndim == 3:
        return M[:, None, :, :]  # (b, 1, n, l)
    return xp.repeat(M, d // M.shape[1], axis=1)  # (b, d, n, l)


def _discretize(u, delta, A, delta_bias, delta_softplus, ct):
    """delta (+ bias, softplus) and A in the compute dtype (Section 2, Eq. 4)."""
    u = u.astype(ct, copy=False)
    delta = delta.astype(ct, copy=False)
    if delta_bias is not None:
        delta = delta + delta_bias.astype(ct)[:, None]  # the bias sits inside the softplus
    if delta_softplus:
        delta = softplus(delta)
    return u, delta, A.astype(ct, copy=False)


def _finish(y, u, D, z, dtype_in, ct):
    if D is not None:
        D = D.astype(ct).reshape((-1,) + (1,) * (u.ndim - 2))  # (d, 1) for (b, d, l); (d,) for (b, d)
        y = y + u * D  # skip connection
    if z is not None:
        y = y * silu(z.astype(ct))  # gate
    return y.astype(dtype_in, copy=False)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False, initial_state=None):
    """The selective scan as the plain recurrence, one time step at a time.

    Mamba paper, Algorithm 2 and Eq. (2a, 2b, 4):
        dA_t = exp(delta_t * A)                 zero-order hold
        dB_t = delta_t * B_t                    Euler (what the official kernel does)
        h_t  = dA_t * h_{t-1} + dB_t * u_t
        y_t  = C_t . h_t + D * u_t,  then y_t * silu(z_t)

    Args:
        u: (b, d, l)  delta: (b, d, l)  A: (d, n)
        B, C: (b, n, l) selective, (b, g, n, l) grouped, or (d, n) fixed
        D: (d,)  z: (b, d, l)  delta_bias: (d,)
        initial_state: (b, d, n) or None (zeros).
            NOTE: an extension over mamba_ssm, whose kernel always starts from zero;
            it lets a prompt be fed through the cache in several chunks.
    Returns: out (b, d, l) in u's dtype, and last_state (b, d, n) when asked.
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    xp = array_module(u)
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype_in = u.dtype
    u, delta, A = _discretize(u, delta, A, delta_bias, delta_softplus, ct)
    b, d, l = u.shape
    n = A.shape[1]
    B = _per_channel(B, d, l, ct)  # broadcasts to (b, d, n, l)
    C = _per_channel(C, d, l, ct)
    h = xp.zeros((b, d, n), dtype=ct) if initial_state is None else initial_state.astype(ct)  # (b, d, n)
    y = xp.empty((b, d, l), dtype=ct)
    for t in range(l):
        dA = xp.exp(delta[:, :, t, None] * A)  # (b, d, n)
        dBu = delta[:, :, t, None] * B[..., t] * u[:, :, t, None]  # (b, d, n)
        h = dA * h + dBu  # (b, d, n)
        y[:, :, t] = (h * C[..., t]).sum(axis=-1)  # (b, d)
    out = _finish(y, u, D, z, dtype_in, ct)
    return (out, h) if return_last_state else out


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                      delta_softplus=False, return_last_state=False, initial_state=None,
                      chunk_size=64):
    """The selective scan, vectorised over chunks of `chunk_size` time steps.

    Same arguments and result as `selective_scan_ref`. The discretisation
    exp(delta A) and the readout C . h are done for a whole chunk at once; only
    the recurrence itself h_t = dA_t h_{t-1} + dBu_t steps one t at a time.
    Memory holds one chunk of states, (b, d, chunk_size, n), never all l of them.
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    xp = array_module(u)
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype_in = u.dtype
    u, delta, A = _discretize(u, delta, A, delta_bias, delta_softplus, ct)
    b, d, l = u.shape
    n = A.shape[1]
    B = _per_channel(B, d, l, ct)
    C = _per_channel(C, d, l, ct)
    h = xp.zeros((b, d, n), dtype=ct) if initial_state is None else initial_state.astype(ct)
    y = xp.empty((b, d, l), dtype=ct)
    for start in range(0, l, chunk_size):
        c = slice(start, min(start + chunk_size, l))
        dt = delta[:, :, c, None]  # (b, d, T, 1)
        dA = xp.exp(dt * A[:, None, :])  # (b, d, T, n)
        dBu = dt * xp.swapaxes(B[..., c], -1, -2) * u[:, :, c, None]  # (b, d, T, n)
        states = xp.empty_like(dBu)  # (b, d, T, n)
        for t in range(dA.shape[2]):
            h = dA[:, :, t] * h + dBu[:, :, t]
            states[:, :, t] = h
        y[:, :, c] = (states * xp.swapaxes(C[..., c], -1, -2)).sum(axis=-1)  # (b, d, T)
    out = _finish(y, u, D, z, dtype_in, ct)
    return (out, h) if return_last_state else out


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One step of the selective scan for decoding, updating `state` in place.

    Args:
        state: (b, d, n), updated in place
        x, dt: (b, d)   A: (d, n)   B, C: (b, n) or (b, g, n)
        D: (d,)  z: (b, d)  dt_bias: (d,)
    Returns: out (b, d) in x's dtype.

    Exactly one iteration of the loop in `selective_scan_ref`.
    """
    b, d, n = check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias)
    xp = array_module(x)
    ct = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    u = x.astype(ct, copy=False)
    B = _per_channel(B[..., None], d, 1, ct)[..., 0] if B.ndim == 3 else B.astype(ct)[:, None, :]  # (b, 1|d, n)
    C = _per_channel(C[..., None], d, 1, ct)[..., 0] if C.ndim == 3 else C.astype(ct)[:, None, :]
    dt = dt.astype(ct, copy=False)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(ct)
    if dt_softplus:
        dt = softplus(dt)
    dA = xp.exp(dt[..., None] * A.astype(ct))  # (b, d, n)
    dBu = dt[..., None] * B * u[..., None]  # (b, d, n)
    h = state.astype(ct) * dA + dBu  # (b, d, n)
    state[...] = h
    y = (h * C).sum(axis=-1)  # (b, d)
    return _finish(y, u, D, z, x.dtype, ct)
