"""Every op's hand-derived backward against central finite differences, in float64.

For an op f and a random upstream gradient g, the backward must give
d<g, f(x)>/dx. We check it as a directional derivative along a random
direction v:  (L(x + eps v) - L(x - eps v)) / (2 eps)  vs  <grad, v>.
With eps = 1e-6 in float64 the central difference is good to ~1e-9
relative (truncation eps^2 ~ 1e-12, rounding ~1e-16/eps ~ 1e-10); we allow 1e-6.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minimamba import ops
from minimamba.training import backward as op

EPS = 1e-6
RTOL = 1e-6  # see the module docstring: ~1e-9 expected, 1e-6 leaves room for ill-conditioned draws

dims = st.integers(min_value=1, max_value=4)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def check_directional(name, loss_fn, x, grad, rng):
    """Compare <grad, v> with the central difference of loss_fn along a random v; print the error."""
    v = rng.standard_normal(x.shape)
    fd = (loss_fn(x + EPS * v) - loss_fn(x - EPS * v)) / (2 * EPS)
    an = float((grad * v).sum())
    err = abs(fd - an)
    scale = max(abs(fd), abs(an), 1e-8)
    print(f"{name}: finite difference {fd:.10g} analytic {an:.10g} abs err {err:.2e} rel err {err / scale:.2e}")
    assert err <= RTOL * scale + 1e-9, f"{name}: rel err {err / scale:.2e}"


@settings(deadline=None, max_examples=8)
@given(b=dims, l=dims, d=st.integers(2, 6), seed=seeds)
def test_rms_norm(b, l, d, seed):
    rng = np.random.default_rng(seed)
    x, w, g = rng.standard_normal((b, l, d)), rng.standard_normal(d), rng.standard_normal((b, l, d))
    y, saved = op.rms_norm_forward(x, w, 1e-5)
    np.testing.assert_allclose(y, ops.rms_norm(x, w, 1e-5))
    dx, dw = op.rms_norm_backward(g, saved)
    check_directional("rms_norm dx", lambda x_: (op.rms_norm_forward(x_, w, 1e-5)[0] * g).sum(), x, dx, rng)
    check_directional("rms_norm dw", lambda w_: (op.rms_norm_forward(x, w_, 1e-5)[0] * g).sum(), w, dw, rng)


@settings(deadline=None, max_examples=8)
@given(b=dims, l=dims, i=dims, o=dims, bias=st.booleans(), seed=seeds)
def test_linear(b, l, i, o, bias, seed):
    rng = np.random.default_rng(seed)
    x, W, g = rng.standard_normal((b, l, i)), rng.standard_normal((o, i)), rng.standard_normal((b, l, o))
    bb = rng.standard_normal(o) if bias else None
    dx, dW, db = op.linear_backward(g, x, W, need_weight_grad=True, need_bias_grad=bias)
    check_directional("linear dx", lambda x_: (op.linear_forward(x_, W, bb)[0] * g).sum(), x, dx, rng)
    check_directional("linear dW", lambda W_: (op.linear_forward(x, W_, bb)[0] * g).sum(), W, dW, rng)
    if bias:
        check_directional("linear db", lambda b_: (op.linear_forward(x, W, b_)[0] * g).sum(), bb, db, rng)


@settings(deadline=None, max_examples=8)
@given(b=dims, l=dims, V=st.integers(2, 7), d=dims, seed=seeds)
def test_embedding(b, l, V, d, seed):
    rng = np.random.default_rng(seed)
    E, g = rng.standard_normal((V, d)), rng.standard_normal((b, l, d))
    ids = rng.integers(0, V, (b, l))  # repeats likely: the scatter-add must sum them
    dE = op.embedding_backward(g, ids, V)
    check_directional("embedding dE", lambda E_: (op.embedding_forward(E_, ids)[0] * g).sum(), E, dE, rng)


@settings(deadline=None, max_examples=8)
@given(b=dims, l=st.integers(1, 7), e=dims, k=st.integers(1, 4), seed=seeds)
def test_causal_conv(b, l, e, k, seed):
    rng = np.random.default_rng(seed)
    x, w, bias, g = (rng.standard_normal((b, l, e)), rng.standard_normal((e, k)), rng.standard_normal(e),
                     rng.standard_normal((b, l, e)))
    out, saved = op.causal_conv_forward(x, w, bias)
    # the (b, l, e) layout computes exactly ops.causal_conv1d_fn on (b, e, l)
    ref = ops.causal_conv1d_fn(x.transpose(0, 2, 1), w, bias).transpose(0, 2, 1)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    dx, dw, db = op.causal_conv_backward(g, saved)
    f = lambda x_, w_, b_: (op.causal_conv_forward(x_, w_, b_)[0] * g).sum()  # noqa: E731
    check_directional("conv dx", lambda x_: f(x_, w, bias), x, dx, rng)
    check_directional("conv dw", lambda w_: f(x, w_, bias), w, dw, rng)
    check_directional("conv dbias", lambda b_: f(x, w, b_), bias, db, rng)


@settings(deadline=None, max_examples=8)
@given(shape=st.tuples(dims, dims), scale=st.sampled_from([1.0, 5.0, 30.0]), seed=seeds)
def test_activations_and_gate(shape, scale, seed):
    rng = np.random.default_rng(seed)
    x, z, g = rng.standard_normal(shape) * scale, rng.standard_normal(shape) * scale, rng.standard_normal(shape)
    check_directional("silu", lambda x_: (ops.silu(x_) * g).sum(), x, op.silu_backward(g, x), rng)
    # softplus at scale 30 crosses the threshold of 20 where the forward switches to x itself
    x_off = x + 0.1 * np.sign(x - 20)  # keep clear of the kink at exactly 20
    check_directional("softplus", lambda x_: (ops.softplus(x_) * g).sum(), x_off, op.softplus_backward(g, x_off), rng)
    out, saved = op.gate_forward(x, z)
    dy, dz = op.gate_backward(g, saved)
    check_directional("gate dy", lambda x_: (op.gate_forward(x_, z)[0] * g).sum(), x, dy, rng)
    check_directional("gate dz", lambda z_: (op.gate_forward(x, z_)[0] * g).sum(), z, dz, rng)


@settings(deadline=None, max_examples=8)
@given(t=st.integers(1, 6), V=st.integers(2, 6), seed=seeds)
def test_cross_entropy(t, V, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((t, V)) * 3
    targets = rng.integers(0, V, t)
    targets[rng.random(t) < 0.3] = -100
    if (targets == -100).all():
        targets[0] = 0
    loss, saved = op.cross_entropy_forward(logits, targets)
    # against the model's own loss, which takes logits[:, :-1] vs labels[:, 1:]
    from minimamba.backend import get_backend
    from minimamba.model import causal_lm_loss

    ref = causal_lm_loss(np.concatenate([logits, logits[:1]])[None], np.concatenate([[0], targets])[None], V,
                         get_backend("numpy"))
    np.testing.assert_allclose(loss, ref, rtol=1e-12)
    dlogits = op.cross_entropy_backward(1.0, saved)
    check_directional("cross_entropy", lambda x_: op.cross_entropy_forward(x_, targets)[0], logits, dlogits, rng)


def scan_inputs(rng, b, l, e, n):
    u = rng.standard_normal((b, l, e))
    delta = ops.softplus(rng.standard_normal((b, l, e)))  # positive, as after the softplus
    A = -np.exp(rng.standard_normal((e, n)) * 0.5)
    B, C = rng.standard_normal((b, l, n)), rng.standard_normal((b, l, n))
    D = rng.standard_normal(e)
    return u, delta, A, B, C, D


@settings(deadline=None, max_examples=8)
@given(b=dims, l=st.integers(1, 9), e=dims, n=dims, seed=seeds)
def test_selective_scan(b, l, e, n, seed):
    rng = np.random.default_rng(seed)
    args = scan_inputs(rng, b, l, e, n)
    g = rng.standard_normal((b, l, e))
    y, states = op.selective_scan_forward(*args)
    u, delta, A, B, C, D = args
    # the forward is minimamba.ops' scan in the other layout
    ref = ops.selective_scan_ref(u.transpose(0, 2, 1), delta.transpose(0, 2, 1), A, B.transpose(0, 2, 1),
                                 C.transpose(0, 2, 1), D).transpose(0, 2, 1)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    grads = op.selective_scan_backward(g, *args, states)
    for i, name in enumerate(["u", "delta", "A", "B", "C", "D"]):
        def f(x_, i=i):
            a = list(args)
            a[i] = x_
            return (op.selective_scan_forward(*a)[0] * g).sum()
        check_directional(f"scan d{name}", f, args[i], grads[i], rng)


@settings(deadline=None, max_examples=6)
@given(b=dims, l=st.integers(1, 11), e=dims, n=dims, chunk=st.integers(1, 4), seed=seeds)
def test_numba_scan_matches_numpy(b, l, e, n, chunk, seed):
    """kernels/cpu_backward.py (chunk-boundary states, recompute) vs the readable twin above."""
    cpu_backward = pytest.importorskip("minimamba.kernels.cpu_backward")
    rng = np.random.default_rng(seed)
    args = scan_inputs(rng, b, l, e, n)
    g = rng.standard_normal((b, l, e))
    y_ref, states = op.selective_scan_forward(*args)
    y, h_start = cpu_backward.scan_forward(*args, chunk=chunk)
    assert h_start.shape == (b, -(-l // chunk), e, n)  # only chunk boundaries are kept
    err = np.abs(y - y_ref).max()
    print(f"forward max abs err {err:.2e}")
    assert err < 1e-12  # same float64 arithmetic in the same order
    ref = op.selective_scan_backward(g, *args, states)
    got = cpu_backward.scan_backward(*args, h_start, g, chunk=chunk)
    for name, r, x in zip(["du", "ddelta", "dA", "dB", "dC", "dD"], ref, got):
        err = np.abs(r - x).max() / max(np.abs(r).max(), 1e-30)
        print(f"{name} max rel err {err:.2e}")
        assert err < 1e-12  # float64, only summation order differs


def test_numba_scan_float32_close_to_float64(rng):
    """The float32 kernel against the float64 twin at a training-like shape: float32 rounding only."""
    cpu_backward = pytest.importorskip("minimamba.kernels.cpu_backward")
    args = scan_inputs(rng, 2, 100, 8, 4)
    g = rng.standard_normal((2, 100, 8))
    y_ref, states = op.selective_scan_forward(*args)
    ref = op.selective_scan_backward(g, *args, states)
    args32 = [a.astype(np.float32) for a in args]
    y, h_start = cpu_backward.scan_forward(*args32, chunk=16)
    got = cpu_backward.scan_backward(*args32, h_start, g.astype(np.float32), chunk=16)
    for name, r, x in zip(["y", "du", "ddelta", "dA", "dB", "dC", "dD"], (y_ref,) + ref, (y,) + got):
        err = np.abs(r - x).max() / np.abs(r).max()
        print(f"{name} float32 vs float64 max rel err {err:.2e}")
        assert err < 1e-4  # float32 eps 6e-8, grown over 100 steps of sums of a few terms


def test_bad_scan_shapes_are_named():
    cpu_backward = pytest.importorskip("minimamba.kernels.cpu_backward")
    u = np.zeros((1, 3, 2), np.float32)
    with pytest.raises(ValueError, match="B has shape"):
        cpu_backward.scan_forward(u, u, np.zeros((2, 4)), np.zeros((1, 3, 5)), np.zeros((1, 3, 4)), np.zeros(2))
