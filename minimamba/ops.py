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
    h  heads, p  channels per head (selective_state_update's multi-head layout, d = h * p)

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


def check_conv_args(x, weight, bias, seq_idx=None, initial_states=None, final_states_out=None):
    """causal_conv1d_fn's arguments; returns (b, d, l, k)."""
    if isinstance(seq_idx, str):
        raise TypeError(f"causal_conv1d_fn got {seq_idx!r} as seq_idx: pass activation by keyword, "
                        "activation='silu' (causal-conv1d's order: x, weight, bias, seq_idx, initial_states, ...)")
    if x.ndim != 3:
        raise ValueError(f"x must have shape (batch, dim, seqlen), got {tuple(x.shape)}")
    b, d, l = x.shape
    if weight.ndim != 2 or weight.shape[0] != d:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({d}, width)")
    k = weight.shape[1]
    check_shape("bias", bias, (d,))
    check_shape("seq_idx", seq_idx, (b, l))
    check_shape("initial_states", initial_states, (b, d, k - 1))
    check_shape("final_states_out", final_states_out, (b, d, k - 1))
    return b, d, l, k


def check_conv_update_args(x, conv_state, weight, bias, cache_seqlens=None, conv_state_indices=None):
    """causal_conv1d_update's arguments, x already (b, d, l); returns (b, d, l, k).

    conv_state has one row per batch row, or any number of rows when conv_state_indices
    picks them.
    """
    if x.ndim != 3:
        raise ValueError(f"x must have shape (batch, dim) or (batch, dim, seqlen), got {tuple(x.shape)}")
    b, d, l = x.shape
    if weight.ndim != 2 or weight.shape[0] != d:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({d}, width)")
    k = weight.shape[1]
    rows = b if conv_state_indices is None else conv_state.shape[0]
    if conv_state.ndim != 3 or tuple(conv_state.shape[:2]) != (rows, d) or conv_state.shape[2] < k - 1:
        raise ValueError(f"conv_state has shape {tuple(conv_state.shape)}, expected ({b}, {d}, >= {k - 1})"
                         + ("" if conv_state_indices is None else " with any number of rows"))
    check_shape("bias", bias, (d,))
    check_shape("cache_seqlens", cache_seqlens, (b,))
    check_state_indices("conv_state_indices", conv_state_indices, b, rows)
    return b, d, l, k


def check_state_indices(name, indices, b, rows):
    """Continuous batching indices: (b,) integers below the number of state rows (negative: padding)."""
    if indices is None:
        return
    check_shape(name, indices, (b,))
    if indices.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {indices.dtype}")
    if b and int(indices.max()) >= rows:
        raise ValueError(f"{name} holds {int(indices.max())}, but the state has only {rows} rows")


def check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices=None):
    """selective_state_update's arguments in the single-head layout; returns (b, d, n).

    state has one row per batch row, or any number when state_batch_indices picks them.
    """
    if state.ndim != 3:
        raise ValueError(f"state must have shape (batch, dim, dstate), got {tuple(state.shape)}")
    rows, d, n = state.shape
    b = rows if state_batch_indices is None else x.shape[0]
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
    check_state_indices("state_batch_indices", state_batch_indices, b, rows)
    return b, d, n


def heads_as_channels(state, x, dt, A, B, C, D, z, dt_bias):
    """mamba_ssm's multi-head layout as the single-head one, heads and head dims flattened.

    state (b, h, p, n), x, dt, z (b, h, p), A (h, p, n), B, C (b, g, n), D, dt_bias (h, p)
    become state (b, h*p, n), x, dt, z (b, h*p), A (h*p, n), D, dt_bias (h*p,): channel
    c = head * p + i. Group j of B/C serves heads j*h/g .. (j+1)*h/g - 1, which are channels
    j*d/g .. (j+1)*d/g - 1: exactly the single-head layout's grouping. The maths is per
    channel, so nothing else changes. The flattened state is a view where the layout
    allows one (else a copy, which the caller writes back).
    """
    if state.ndim != 4:
        raise ValueError(f"state must have shape (batch, nheads, headdim, dstate), got {tuple(state.shape)}")
    rows, h, p, n = state.shape
    b = x.shape[0]
    check_shape("x", x, (b, h, p))
    check_shape("dt", dt, (b, h, p))
    check_shape("A", A, (h, p, n))
    check_shape("D", D, (h, p))
    check_shape("z", z, (b, h, p))
    check_shape("dt_bias", dt_bias, (h, p))
    for name, M in (("B", B), ("C", C)):
        if M.ndim != 3 or tuple(M.shape[::2]) != (b, n) or h % M.shape[1] != 0:
            raise ValueError(f"{name} has shape {tuple(M.shape)}, expected ({b}, groups, {n}) "
                             f"with groups dividing nheads = {h}")

    def flat(a, shape):
        return None if a is None else a.reshape(shape)
    d = h * p
    return (state.reshape(rows, d, n), flat(x, (b, d)), flat(dt, (b, d)), A.reshape(d, n), B, C,
            flat(D, (d,)), flat(z, (b, d)), flat(dt_bias, (d,)))


def on_heads_as_channels(step, state, x, dt, A, B, C, D, z, dt_bias, **kwargs):
    """Run the single-head `step` on the multi-head arguments (see heads_as_channels); out shaped like x."""
    flat = heads_as_channels(state, x, dt, A, B, C, D, z, dt_bias)
    out = step(*flat, **kwargs)
    if not array_module(state).may_share_memory(flat[0], state):  # the layout forced a copy: write it back
        state[...] = flat[0].reshape(state.shape)
    return out.reshape(x.shape)


def on_state_rows(step, state, indices, *args, **kwargs):
    """Continuous batching: batch row i reads and writes state[indices[i]].

    `step(rows, *args, **kwargs)` runs on a gathered copy of those rows (one per batch
    row), which is then written back. A negative index marks a padded batch row: its
    output is 0 and no state row is touched (as mamba_ssm's and causal-conv1d's kernels
    do). Returns step's output.
    """
    xp = array_module(state)
    valid = indices >= 0  # (b,)
    rows = state[xp.where(valid, indices, 0)]  # (b, ...) a copy
    rows[~valid] = 0
    out = step(rows, *args, **kwargs)
    state[indices[valid]] = rows[valid]
    out[~valid] = 0
    return out


# ---------------------------------------------------------------- causal conv


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """Causal depthwise conv over the sequence: out[t] = sum_j w[j] x[t - (k-1) + j].

    Args:
        x: (b, d, l)
        weight: (d, k); weight[:, k-1] multiplies the current position
        bias: (d,) or None
        seq_idx: (b, l) integers or None: several sequences packed into one row; position t
            sees only the earlier positions of its own sequence, seq_idx[:, t]. Where
            seq_idx < 0 (padding) the output is 0.
        initial_states: (b, d, k-1) or None (zeros): the k-1 inputs before x[:, :, 0]. With
            seq_idx they belong to the sequence of position 0.
        return_final_states: also return the last k-1 inputs of [initial_states, x], what
            causal_conv1d_update's conv_state holds after this sequence (not with seq_idx)
        final_states_out: (b, d, k-1) or None: written with the final states, and returned
        activation: None, "silu" or "swish"
    Returns: out (b, d, l) in the dtype of x; and the final states (b, d, k-1), also in the
    dtype of x, when return_final_states.

    The cross-correlation of torch's Conv1d with padding k-1, keeping the first
    l outputs: position t sees only x[t-k+1 .. t].
    """
    xp = array_module(x)
    b, d, l, k = check_conv_args(x, weight, bias, seq_idx, initial_states, final_states_out)
    if seq_idx is not None and return_final_states:
        raise ValueError("return_final_states is not supported with seq_idx (as in causal-conv1d)")
    ct = compute_dtype(x, weight)
    left = xp.zeros((b, d, k - 1), dtype=ct) if initial_states is None else initial_states.astype(ct)
    x_pad = xp.concatenate([left, x.astype(ct)], axis=2)  # (b, d, k-1+l): what the first outputs see
    if seq_idx is not None:
        # the sequence each padded position belongs to: initial states go with position 0's, zeros with none
        first = seq_idx[:, :1] if initial_states is not None else xp.full((b, 1), -1, dtype=seq_idx.dtype)
        seq_pad = xp.concatenate([xp.broadcast_to(first, (b, k - 1)), seq_idx], axis=1)  # (b, k-1+l)
    out = xp.zeros((b, d, l), dtype=ct)  # (b, d, l)
    for j in range(k):
        tap = weight[None, :, j:j + 1].astype(ct) * x_pad[:, :, j:j + l]  # (b, d, l)
        if seq_idx is not None:
            tap = tap * (seq_pad[:, None, j:j + l] == seq_idx[:, None, :])  # only inputs of the same sequence
        out += tap
    if bias is not None:
        out += bias.astype(ct)[None, :, None]
    if seq_idx is not None:
        out = xp.where(seq_idx[:, None, :] < 0, ct.type(0), out)  # padding positions give 0
    out = _activation(out, activation).astype(x.dtype, copy=False)
    if not return_final_states:
        return out
    return with_final_states(out, x_pad[:, :, l:].astype(x.dtype), final_states_out)  # the last k-1 inputs


def with_final_states(out, final_states, final_states_out):
    """causal_conv1d_fn's (out, final_states (b, d, k-1)), written into final_states_out when given."""
    if final_states_out is None:
        return out, final_states
    final_states_out[...] = final_states
    return out, final_states_out


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """One step (or a few) of the causal conv, reading and writing `conv_state`.

    Args:
        x: (b, d) or (b, d, l): the new pre-conv inputs
        conv_state: (b, d, s) with s >= k - 1: the last s inputs seen; updated in place
        weight: (d, k); bias: (d,) or None; activation: None, "silu" or "swish"
        cache_seqlens: (b,) integers or None. None: conv_state holds the inputs in order,
            oldest first, and is shifted left by l. Given: conv_state is a circular
            buffer; cache_seqlens[i] inputs have been seen, input number m sits at slot
            m % s, and the new ones are written at cache_seqlens[i] + 0 .. l-1 (mod s).
        conv_state_indices: (b,) integers or None: batch row i uses conv_state[indices[i]]
            (continuous batching); a negative index is a padded row: output 0, no state touched.
    Returns: the conv output, shape and dtype of x.

    Same result as running causal_conv1d_fn over [everything seen so far, x]
    and keeping the last outputs: the state plays the part of the left padding
    (a zero state is exactly the zero padding of a fresh sequence).
    """
    single = x.ndim == 2
    x3 = x[:, :, None] if single else x  # (b, d, l)
    check_conv_update_args(x3, conv_state, weight, bias, cache_seqlens, conv_state_indices)
    if conv_state_indices is not None:
        out = on_state_rows(_conv_update, conv_state, conv_state_indices, x3, weight, bias, activation,
                            cache_seqlens)
    else:
        out = _conv_update(conv_state, x3, weight, bias, activation, cache_seqlens)
    return out[:, :, 0] if single else out


def _conv_update(conv_state, x, weight, bias, activation, cache_seqlens):
    """causal_conv1d_update with x (b, d, l) and one conv_state row per batch row."""
    xp = array_module(x)
    b, d, l, k = check_conv_update_args(x, conv_state, weight, bias, cache_seqlens)
    s = conv_state.shape[2]
    ct = compute_dtype(x, weight)
    if cache_seqlens is None:
        full = xp.concatenate([conv_state.astype(ct), x.astype(ct)], axis=2)  # (b, d, s + l)
        start = s - (k - 1)  # first input the first new output can see
        conv_state[...] = full[:, :, -s:]
    else:
        seen = cache_seqlens.astype(np.int64)  # (b,)
        last = (seen[:, None] + xp.arange(-(k - 1), 0)) % s  # (b, k-1): slots of the k-1 latest inputs
        left = xp.take_along_axis(conv_state, last[:, None, :], axis=2)  # (b, d, k-1)
        full = xp.concatenate([left.astype(ct), x.astype(ct)], axis=2)  # (b, d, k-1 + l)
        start = 0
        rows = xp.arange(b)
        for t in range(l):  # write the new inputs into the ring, one step at a time
            conv_state[rows, :, (seen + t) % s] = x[:, :, t]
    out = xp.zeros((b, d, l), dtype=ct)
    for j in range(k):
        out += weight[None, :, j:j + 1].astype(ct) * full[:, :, start + j:start + j + l]
    if bias is not None:
        out += bias.astype(ct)[None, :, None]
    return _activation(out, activation).astype(x.dtype, copy=False)


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


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """One step of the selective scan for decoding, updating `state` in place.

    Args, in the single-head layout (Mamba-1):
        state: (b, d, n), updated in place
        x, dt: (b, d)   A: (d, n)   B, C: (b, n) or (b, g, n)
        D: (d,)  z: (b, d)  dt_bias: (d,)
    or in mamba_ssm's multi-head layout (h heads of p channels each):
        state: (b, h, p, n)  x, dt, z: (b, h, p)  A: (h, p, n)
        B, C: (b, g, n), group j shared by heads j*h/g .. (j+1)*h/g - 1
        D, dt_bias: (h, p)
    state_batch_indices: (b,) integers or None: batch row i uses state[indices[i]]
        (continuous batching); a negative index is a padded row: output 0, no state touched.
    Returns: out, shaped like x, in x's dtype. The state keeps its dtype.

    Exactly one iteration of the loop in `selective_scan_ref`.
    """
    if state.ndim == 4:  # multi-head: the same maths per channel, heads flattened into channels
        return on_heads_as_channels(selective_state_update, state, x, dt, A, B, C, D, z, dt_bias,
                                    dt_softplus=dt_softplus, state_batch_indices=state_batch_indices)
    check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    if state_batch_indices is not None:
        return on_state_rows(_state_update, state, state_batch_indices, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return _state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def _state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """selective_state_update in the single-head layout, one state row per batch row."""
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
    if state.dtype.itemsize < 4:
        # NOTE: a float16 state is read back as stored, rounded, as selective_state_update_ref
        # reads it (and the next step will); float32 and float64 states give h itself.
        h = state.astype(ct)
    y = (h * C).sum(axis=-1)  # (b, d)
    return _finish(y, u, D, z, x.dtype, ct)
