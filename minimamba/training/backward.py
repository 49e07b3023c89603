"""Every op of the Mamba model with its hand-derived backward, side by side.

Each op comes as a pair:
    <op>_forward(inputs...)  -> output, saved      (saved: what the backward needs)
    <op>_backward(dout, saved) -> gradients of the inputs, in the order of the forward's arguments

Nothing here keeps global state; the whole-model pass in `minimamba.training.grad`
chains the pairs. The forwards call the functions of `minimamba.ops` where they
exist, so the training forward computes exactly what inference computes.

Layout is time before channels, (b, l, e), the layout the matmuls produce
(`minimamba.ops` uses the kernels' (b, e, l); the tests check the two agree).

Glossary (as in minimamba/model.py):
    b batch   l length   d hidden_size   e intermediate_size   n state_size
    k conv_kernel   r time_step_rank   V vocab_size

Every backward is checked against central finite differences in float64
(tests/test_training_backward.py).
"""

from __future__ import annotations

import numpy as np

from .. import ops

# ---------------------------------------------------------------- embedding and linear


def embedding_forward(weight, ids):
    """out[b, t] = weight[ids[b, t]]."""
    return weight[ids], ids  # (b, l, d)


def embedding_backward(dout, ids, vocab_size):
    """d weight: each row sums the gradients of the positions that read it (a scatter-add)."""
    dweight = np.zeros((vocab_size, dout.shape[-1]), dtype=dout.dtype)  # (V, d)
    np.add.at(dweight, ids.reshape(-1), dout.reshape(-1, dout.shape[-1]))
    return dweight


def linear_forward(x, weight, bias=None):
    """y = x W^T + b, as torch.nn.Linear. x (..., in), W (out, in)."""
    y = x @ weight.T  # (..., out)
    if bias is not None:
        y = y + bias
    return y, x


def linear_backward(dy, x, weight, need_weight_grad=True, need_bias_grad=False):
    """dx = dy W;  dW = dy^T x (summed over every leading position);  db = sum dy."""
    dx = dy @ weight  # (..., in)
    dweight = dbias = None
    if need_weight_grad:
        dweight = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # (out, in)
    if need_bias_grad:
        dbias = dy.reshape(-1, dy.shape[-1]).sum(axis=0)  # (out,)
    return dx, dweight, dbias


# ---------------------------------------------------------------- RMSNorm


def rms_norm_forward(x, weight, eps):
    """y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps) over the last axis."""
    y = ops.rms_norm(x, weight, eps)
    rstd = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
    return y, (x, weight, rstd)


def rms_norm_backward(dy, saved):
    """With x_hat = x * rstd and g = dy * w:
        dw = sum over positions of dy * x_hat
        dx = rstd * (g - x_hat * mean(g * x_hat))   (the mean is over the normalised axis)
    """
    x, weight, rstd = saved
    x_hat = x * rstd  # (..., d)
    g = dy * weight  # (..., d)
    dx = rstd * (g - x_hat * (g * x_hat).mean(axis=-1, keepdims=True))
    dweight = (dy * x_hat).reshape(-1, x.shape[-1]).sum(axis=0)  # (d,)
    return dx, dweight


# ---------------------------------------------------------------- activations


def silu_forward(x):
    return ops.silu(x), x


def silu_grad(x):
    """d/dx x sigmoid(x) = sigmoid(x) (1 + x (1 - sigmoid(x)))."""
    s = 1.0 / (1.0 + np.exp(-x))
    return s * (1.0 + x * (1.0 - s))


def silu_backward(dy, x):
    return dy * silu_grad(x)


def softplus_forward(x, threshold=20.0):
    return ops.softplus(x, threshold), x


def softplus_backward(dy, x, threshold=20.0):
    """d/dx log(1 + e^x) = sigmoid(x); 1 above the threshold where the forward is x itself."""
    s = 1.0 / (1.0 + np.exp(-np.minimum(x, threshold)))
    return dy * np.where(x > threshold, 1.0, s).astype(dy.dtype, copy=False)


# ---------------------------------------------------------------- causal depthwise conv


def causal_conv_forward(x, weight, bias=None):
    """out[:, t, c] = sum_j weight[c, j] x[:, t - (k-1) + j, c] + bias[c]  (zero before t = 0).

    x (b, l, e), weight (e, k), bias (e,). The same op as `ops.causal_conv1d_fn`
    in the (b, l, e) layout (weight[:, k-1] multiplies the current position).
    """
    b, l, e = x.shape
    k = weight.shape[1]
    x_pad = np.concatenate([np.zeros((b, k - 1, e), dtype=x.dtype), x], axis=1)  # (b, k-1+l, e)
    out = np.zeros_like(x)  # (b, l, e)
    for j in range(k):
        out += weight[:, j] * x_pad[:, j:j + l]
    if bias is not None:
        out += bias
    return out, (x_pad, weight)


def causal_conv_backward(dout, saved, need_bias_grad=True):
    """Tap j sees x shifted by k-1-j, so
        dx[:, s] = sum_j weight[:, j] dout[:, s + (k-1) - j]     (positions past the end drop out)
        dweight[:, j] = sum over b, t of dout[:, t] x_pad[:, t + j]
        dbias = sum over b, t of dout
    """
    x_pad, weight = saved
    l = dout.shape[1]
    k = weight.shape[1]
    dx_pad = np.zeros_like(x_pad)  # (b, k-1+l, e)
    dweight = np.empty_like(weight)  # (e, k)
    for j in range(k):
        dx_pad[:, j:j + l] += weight[:, j] * dout
        dweight[:, j] = (dout * x_pad[:, j:j + l]).sum(axis=(0, 1))
    dbias = dout.sum(axis=(0, 1)) if need_bias_grad else None
    return dx_pad[:, k - 1:], dweight, dbias


# ---------------------------------------------------------------- selective scan


def selective_scan_forward(u, delta, A, B, C, D):
    """The recurrence of Algorithm 2, keeping every state for the backward.

        h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t      (h_{-1} = 0)
        y_t = C_t . h_t + D u_t

    u, delta (b, l, e) with delta already through softplus; A (e, n);
    B, C (b, l, n); D (e,). Returns y (b, l, e) and the states (b, l, e, n).
    This readable version stores all l states; the Numba kernel
    (`minimamba.kernels.cpu_backward`) stores only chunk boundaries and recomputes.
    """
    b, l, e = u.shape
    n = A.shape[1]
    h = np.zeros((b, e, n), dtype=u.dtype)  # (b, e, n)
    states = np.empty((b, l, e, n), dtype=u.dtype)
    for t in range(l):
        dA = np.exp(delta[:, t, :, None] * A)  # (b, e, n)
        h = dA * h + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]  # (b, e, n)
        states[:, t] = h
    y = np.einsum("blen,bln->ble", states, C) + u * D  # (b, l, e)
    return y, states


def selective_scan_backward(dy, u, delta, A, B, C, D, states):
    """The reverse-time recurrence. With g_t = dy_t and dA_t = exp(delta_t A):

        dh_t      = g_t C_t + dA_{t+1} * dh_{t+1}              (total gradient reaching h_t)
        dC_t      = sum_e g_t h_t
        d dA_t    = dh_t * h_{t-1}
        ddelta_t  = sum_n (d dA_t * dA_t * A + dh_t * B_t u_t)
        dA       += d dA_t * dA_t * delta_t                  (summed over b, t)
        dB_t      = sum_e dh_t delta_t u_t
        du_t      = sum_n dh_t delta_t B_t + D g_t
        dD        = sum over b, t of g_t u_t

    Returns du, ddelta (b, l, e); dA (e, n); dB, dC (b, l, n); dD (e,).
    """
    b, l, e = u.shape
    n = A.shape[1]
    du = np.empty_like(u)
    ddelta = np.empty_like(u)
    dA_sum = np.zeros_like(A)  # (e, n)
    dB = np.empty_like(B)
    dC = np.einsum("ble,blen->bln", dy, states)  # (b, l, n)
    dh_next = np.zeros((b, e, n), dtype=u.dtype)  # dA_{t+1} * dh_{t+1}
    for t in range(l - 1, -1, -1):
        dh = dh_next + dy[:, t, :, None] * C[:, t, None, :]  # (b, e, n)
        decay = np.exp(delta[:, t, :, None] * A)  # (b, e, n)
        h_prev = states[:, t - 1] if t > 0 else np.zeros_like(dh)
        d_decay = dh * h_prev  # (b, e, n)
        Bu = B[:, t, None, :] * u[:, t, :, None]  # (b, e, n)
        ddelta[:, t] = (d_decay * decay * A + dh * Bu).sum(axis=-1)  # (b, e)
        dA_sum += (d_decay * decay * delta[:, t, :, None]).sum(axis=0)
        dB[:, t] = (dh * (delta[:, t] * u[:, t])[:, :, None]).sum(axis=1)  # (b, n)
        du[:, t] = (dh * B[:, t, None, :]).sum(axis=-1) * delta[:, t] + D * dy[:, t]  # (b, e)
        dh_next = dh * decay
    dD = (dy * u).sum(axis=(0, 1))  # (e,)
    return du, ddelta, dA_sum, dB, dC, dD


# ---------------------------------------------------------------- gate


def gate_forward(y, z):
    """out = y * silu(z): the multiplicative gate of Figure 3."""
    return y * ops.silu(z), (y, z)


def gate_backward(dout, saved):
    y, z = saved
    return dout * ops.silu(z), dout * y * silu_grad(z)


# ---------------------------------------------------------------- loss


def cross_entropy_forward(logits, targets, ignore_index=-100):
    """Mean of -log softmax(logits)[target] over positions whose target is not ignore_index.

    logits (t, V), targets (t,). Computed in the logits' dtype with the max
    subtracted (the same logsumexp as `minimamba.model.causal_lm_loss`).
    """
    counted = targets != ignore_index
    count = int(counted.sum())
    if count == 0:
        raise ValueError("every target is ignore_index: nothing to compute a loss over")
    top = logits.max(axis=-1, keepdims=True)
    shifted = logits - top
    log_z = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # (t, 1)
    log_probs = shifted - log_z  # (t, V)
    safe = np.where(counted, targets, 0)
    picked = log_probs[np.arange(len(targets)), safe]  # (t,)
    loss = -(picked * counted).sum() / count
    return loss, (log_probs, safe, counted, count)


def cross_entropy_backward(dloss, saved):
    """d logits = (softmax - onehot(target)) / count on counted positions, 0 elsewhere."""
    log_probs, safe, counted, count = saved
    dlogits = np.exp(log_probs)  # (t, V): softmax
    dlogits[np.arange(len(safe)), safe] -= 1.0
    dlogits *= (counted * (dloss / count))[:, None].astype(dlogits.dtype)
    return dlogits
