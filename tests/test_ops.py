"""Property tests of minimamba.ops against selective_scan_ref and a plain-Python recurrence written here.

The plain recurrence below shares no code with minimamba: scalar Python floats,
one (batch, channel, state, time) element at a time, straight from the paper's
Eq. (2a, 2b, 4). It is the independent reference; `selective_scan_ref` is the
library's own reference twin, and every vectorised function is compared with both.

Tolerances: float64 against the float64 plain loop, 1e-12 relative (a handful of
roundings of 1.1e-16 each over <= 12 steps). float32 against the float64 plain loop,
5e-6 relative to the output's scale: each step rounds exp, products and sums to
float32 (6e-8 each); over <= 12 steps with |dA| <= 1 that is at most ~50 roundings
(3e-6); measured errors are ~1e-7. Outputs are compared with atol = tol * max|want| so values near zero
(where relative error is meaningless) do not fail spuriously.
"""

import math

import numpy as np
import pytest
from _compare import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from minimamba import ops

TOL = {np.float32: 5e-6, np.float64: 1e-12}
DTYPES = st.sampled_from([np.float32, np.float64])


# ---------------------------------------------------------------- the independent plain recurrence


def plain_softplus(v):
    return v if v > 20 else math.log1p(math.exp(v))


def plain_silu(v):
    return v / (1 + math.exp(-v))


def plain_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t;  y_t = C_t . h_t + D u_t;  y_t * silu(z_t). Scalars only."""
    b, d, l = u.shape
    n = A.shape[1]

    def bc(M, i, c, s, t):  # B or C for batch i, channel c, state s, time t in any of the three layouts
        if M.ndim == 2:
            return float(M[c, s])
        if M.ndim == 3:
            return float(M[i, s, t])
        groups = M.shape[1]
        return float(M[i, c // (d // groups), s, t])

    y = np.zeros((b, d, l))
    last = np.zeros((b, d, n))
    for i in range(b):
        for c in range(d):
            h = [0.0 if initial_state is None else float(initial_state[i, c, s]) for s in range(n)]
            for t in range(l):
                dt = float(delta[i, c, t]) + (0.0 if delta_bias is None else float(delta_bias[c]))
                if delta_softplus:
                    dt = plain_softplus(dt)
                out = 0.0
                for s in range(n):
                    h[s] = math.exp(dt * float(A[c, s])) * h[s] + dt * bc(B, i, c, s, t) * float(u[i, c, t])
                    out += bc(C, i, c, s, t) * h[s]
                if D is not None:
                    out += float(D[c]) * float(u[i, c, t])
                if z is not None:
                    out *= plain_silu(float(z[i, c, t]))
                y[i, c, t] = out
            last[i, c] = h
    return y, last


def plain_conv(x, weight, bias=None, silu=False):
    """out[t] = sum_j weight[j] * x[t - (k-1) + j], zeros before the start."""
    b, d, l = x.shape
    k = weight.shape[1]
    out = np.zeros((b, d, l))
    for i in range(b):
        for c in range(d):
            for t in range(l):
                acc = 0.0 if bias is None else float(bias[c])
                for j in range(k):
                    src = t - (k - 1) + j
                    if src >= 0:
                        acc += float(weight[c, j]) * float(x[i, c, src])
                out[i, c, t] = plain_silu(acc) if silu else acc
    return out


# ---------------------------------------------------------------- random problems


@st.composite
def scan_problems(draw):
    """Random shapes, every optional argument on or off, B/C in any of their three layouts."""
    b = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2]))
    d = groups * draw(st.integers(1, 3))
    n = draw(st.integers(1, 4))
    l = draw(st.integers(1, 12))
    dtype = draw(DTYPES)
    layout = draw(st.sampled_from(["bnl", "bgnl", "dn"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shape_bc = {"bnl": (b, n, l), "bgnl": (b, groups, n, l), "dn": (d, n)}[layout]
    p = dict(
        u=rng.standard_normal((b, d, l)),
        delta=rng.standard_normal((b, d, l)) * 0.5 + (0.0 if draw(st.booleans()) else 0.6),
        A=-np.exp(rng.standard_normal((d, n)) * 0.5),
        B=rng.standard_normal(shape_bc),
        C=rng.standard_normal(shape_bc),
        D=rng.standard_normal(d) if draw(st.booleans()) else None,
        z=rng.standard_normal((b, d, l)) if draw(st.booleans()) else None,
        delta_bias=rng.standard_normal(d) * 0.5 if draw(st.booleans()) else None,
    )
    p = {k: (None if v is None else v.astype(dtype)) for k, v in p.items()}
    softplus = draw(st.booleans())
    if not softplus:  # the recurrence needs dt >= 0 to stay a decay
        p["delta"] = np.abs(p["delta"])
        if p["delta_bias"] is not None:
            p["delta_bias"] = np.abs(p["delta_bias"])
    p["delta_softplus"] = softplus
    return p, dtype


def as64(p):
    return {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v) for k, v in p.items()}


def scale_tol(dtype, want):
    return TOL[dtype] * max(1.0, float(np.abs(want).max()))


# ---------------------------------------------------------------- selective scan


@settings(deadline=None, max_examples=40)
@given(scan_problems())
def test_selective_scan_against_plain_recurrence(problem):
    p, dtype = problem
    want_y, want_h = plain_scan(**as64(p))
    for name, fn in (("selective_scan_ref", ops.selective_scan_ref), ("selective_scan_fn", ops.selective_scan_fn)):
        y, h = fn(**p, return_last_state=True)
        assert y.dtype == dtype and h.dtype == dtype
        assert_close(f"{name} {np.dtype(dtype).name} y", y, want_y, scale_tol(dtype, want_y))
        assert_close(f"{name} {np.dtype(dtype).name} last_state", h, want_h, scale_tol(dtype, want_h))


@settings(deadline=None, max_examples=30)
@given(scan_problems(), st.integers(1, 5))
def test_selective_scan_fn_equals_ref_for_any_chunk_size(problem, chunk_size):
    """The chunked scan does the same arithmetic as the loop, in the same order: equal to a few ulps."""
    p, dtype = problem
    y_ref, h_ref = ops.selective_scan_ref(**p, return_last_state=True)
    y, h = ops.selective_scan_fn(**p, return_last_state=True, chunk_size=chunk_size)
    tol = {np.float32: 1e-6, np.float64: 1e-14}[dtype]
    assert_close("fn vs ref y", y, y_ref, tol * max(1.0, float(np.abs(y_ref).max())))
    assert_close("fn vs ref state", h, h_ref, tol * max(1.0, float(np.abs(h_ref).max())))


@settings(deadline=None, max_examples=30)
@given(scan_problems(), st.data())
def test_state_carried_across_a_split(problem, data):
    """scan(all) == scan(first part) then scan(second part, initial_state=its last state)."""
    p, dtype = problem
    l = p["u"].shape[2]
    if l < 2:
        return
    cut = data.draw(st.integers(1, l - 1))

    def part(sl):
        q = dict(p)
        for k in ("u", "delta", "z"):
            if q[k] is not None:
                q[k] = q[k][..., sl]
        for k in ("B", "C"):
            if q[k].ndim > 2:
                q[k] = q[k][..., sl]
        return q

    want_y, want_h = plain_scan(**as64(p))
    for fn in (ops.selective_scan_ref, ops.selective_scan_fn):
        y1, h1 = fn(**part(slice(0, cut)), return_last_state=True)
        y2, h2 = fn(**part(slice(cut, l)), return_last_state=True, initial_state=h1)
        y = np.concatenate([y1, y2], axis=2)
        assert_close(f"{fn.__name__} split at {cut}/{l}", y, want_y, scale_tol(dtype, want_y))
        assert_close(f"{fn.__name__} split last state", h2, want_h, scale_tol(dtype, want_h))
    # and the initial state itself against the plain loop
    y_plain2, _ = plain_scan(**as64(part(slice(cut, l))), initial_state=h1.astype(np.float64))
    assert_close("initial_state vs plain", y2, y_plain2, scale_tol(dtype, y_plain2))


@settings(deadline=None, max_examples=30)
@given(scan_problems())
def test_prefill_equals_repeated_state_update(problem):
    """selective_state_update, once per token, gives the scan's outputs and its last state."""
    p, dtype = problem
    if p["B"].ndim == 2:  # selective_state_update takes B, C per token: (b, n) or (b, g, n)
        return
    y_scan, h_scan = ops.selective_scan_fn(**p, return_last_state=True)
    b, d, l = p["u"].shape
    state = np.zeros((b, d, p["A"].shape[1]), dtype=dtype)
    ys = []
    for t in range(l):
        ys.append(ops.selective_state_update(
            state, p["u"][..., t], p["delta"][..., t], p["A"], p["B"][..., t], p["C"][..., t], D=p["D"],
            z=None if p["z"] is None else p["z"][..., t], dt_bias=p["delta_bias"], dt_softplus=p["delta_softplus"]))
    y = np.stack(ys, axis=2)
    assert y.dtype == dtype
    tol = {np.float32: 1e-6, np.float64: 1e-14}[dtype]
    assert_close("state_update y", y, y_scan, tol * max(1.0, float(np.abs(y_scan).max())))
    assert_close("state_update state", state, h_scan, tol * max(1.0, float(np.abs(h_scan).max())))


# ---------------------------------------------------------------- causal conv


@st.composite
def conv_problems(draw):
    b, d, l, k = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 10)), draw(st.integers(1, 5))
    dtype = draw(DTYPES)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((b, d, l)).astype(dtype)
    weight = rng.standard_normal((d, k)).astype(dtype)
    bias = rng.standard_normal(d).astype(dtype) if draw(st.booleans()) else None
    activation = draw(st.sampled_from([None, "silu", "swish"]))
    return x, weight, bias, activation, dtype


@settings(deadline=None, max_examples=40)
@given(conv_problems())
def test_causal_conv1d_fn_against_plain_loop(problem):
    x, weight, bias, activation, dtype = problem
    want = plain_conv(x.astype(np.float64), weight.astype(np.float64),
                      None if bias is None else bias.astype(np.float64), silu=activation is not None)
    out = ops.causal_conv1d_fn(x, weight, bias, activation=activation)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(f"causal_conv1d_fn {np.dtype(dtype).name}", out, want, scale_tol(dtype, want))


@settings(deadline=None, max_examples=40)
@given(conv_problems(), st.data())
def test_causal_conv1d_update_in_chunks_equals_one_pass(problem, data):
    """Feeding x in random chunks (single steps as (b, d)) through conv_state == causal_conv1d_fn."""
    x, weight, bias, activation, dtype = problem
    b, d, l = x.shape
    k = weight.shape[1]
    extra = data.draw(st.integers(0, 2))  # a state longer than k - 1, as transformers keeps k
    state = np.zeros((b, d, max(k - 1, 0) + extra), dtype=dtype)
    if state.shape[2] == 0:
        state = np.zeros((b, d, 1), dtype=dtype)
    outs, t = [], 0
    while t < l:
        size = data.draw(st.integers(1, l - t))
        if size == 1 and data.draw(st.booleans()):
            outs.append(ops.causal_conv1d_update(x[:, :, t], state, weight, bias, activation)[:, :, None])
        else:
            outs.append(ops.causal_conv1d_update(x[:, :, t:t + size], state, weight, bias, activation))
        t += size
    want = ops.causal_conv1d_fn(x, weight, bias, activation=activation)
    tol = {np.float32: 1e-6, np.float64: 1e-14}[dtype]
    assert_close("conv update chunks", np.concatenate(outs, axis=2), want, tol * max(1.0, float(np.abs(want).max())))
    s = state.shape[2]
    tail = np.concatenate([np.zeros((b, d, s), dtype=dtype), x], axis=2)[:, :, -s:]
    np.testing.assert_array_equal(state, tail)  # the state holds the last s inputs exactly


# ---------------------------------------------------------------- activations and norm


@settings(deadline=None, max_examples=30)
@given(st.lists(st.floats(-60, 60), min_size=1, max_size=20), DTYPES)
def test_activations_against_math(values, dtype):
    x = np.asarray(values, dtype=dtype)
    tol = {np.float32: 2e-7, np.float64: 1e-15}[dtype]
    assert_close("softplus", ops.softplus(x), [plain_softplus(float(v)) for v in x],
                 tol * max(1.0, float(np.abs(x).max())), rtol=4 * tol)
    assert_close("silu", ops.silu(x), [plain_silu(float(v)) for v in x], tol * max(1.0, float(np.abs(x).max())),
                 rtol=4 * tol)
    assert np.all(np.isfinite(ops.silu(np.asarray([-1e4, 1e4], dtype=dtype))))


@settings(deadline=None, max_examples=30)
@given(st.integers(1, 3), st.integers(1, 9), DTYPES, st.integers(0, 2**32 - 1))
def test_rms_norm_against_plain(rows, d, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, d)).astype(dtype) * 3
    w = rng.standard_normal(d).astype(dtype)
    want = np.array([[float(x[i, j]) / math.sqrt(sum(float(v) ** 2 for v in x[i]) / d + 1e-5) * float(w[j])
                      for j in range(d)] for i in range(rows)])
    out = ops.rms_norm(x, w, 1e-5)
    assert out.dtype == dtype
    assert_close("rms_norm", out, want, scale_tol(dtype, want))


# ---------------------------------------------------------------- errors that name the problem


def _scan_args(b=2, d=4, n=3, l=5):
    rng = np.random.default_rng(0)
    return dict(u=rng.standard_normal((b, d, l)), delta=rng.random((b, d, l)), A=-rng.random((d, n)),
                B=rng.standard_normal((b, n, l)), C=rng.standard_normal((b, n, l)))


@pytest.mark.parametrize("fn", [ops.selective_scan_fn, ops.selective_scan_ref])
@pytest.mark.parametrize("name, shape, words", [
    ("delta", (2, 4, 6), "delta has shape (2, 4, 6), expected (2, 4, 5)"),
    ("A", (5, 3), "A has shape (5, 3)"),
    ("B", (2, 3, 4), "B has shape (2, 3, 4)"),
    ("C", (2, 3, 3, 5), "C has shape (2, 3, 3, 5)"),  # 3 groups do not divide 4 channels
    ("D", (3,), "D has shape (3,), expected (4,)"),
    ("z", (2, 4), "z has shape (2, 4), expected (2, 4, 5)"),
    ("delta_bias", (4, 1), "delta_bias has shape (4, 1)"),
    ("initial_state", (2, 4, 2), "initial_state has shape (2, 4, 2), expected (2, 4, 3)"),
    ("u", (2, 4), "u must have shape (batch, dim, seqlen)"),
])
def test_scan_shape_errors_name_the_argument(fn, name, shape, words):
    args = _scan_args()
    args[name] = np.zeros(shape)
    with pytest.raises(ValueError) as err:
        fn(**args)
    print(err.value)
    assert words in str(err.value)


def test_state_update_and_conv_shape_errors():
    s = np.zeros((2, 4, 3))
    good = dict(x=np.zeros((2, 4)), dt=np.zeros((2, 4)), A=np.zeros((4, 3)), B=np.zeros((2, 3)), C=np.zeros((2, 3)))
    for name, shape in (("x", (2, 5)), ("dt", (1, 4)), ("A", (4, 2)), ("B", (2, 4)), ("C", (3, 3))):
        with pytest.raises(ValueError, match=rf"^{name} has shape"):
            ops.selective_state_update(s, **dict(good, **{name: np.zeros(shape)}))
    with pytest.raises(ValueError, match="state must have shape"):
        ops.selective_state_update(np.zeros((2, 4)), **good)
    with pytest.raises(ValueError, match=r"weight has shape \(3, 4\), expected \(4, width\)"):
        ops.causal_conv1d_fn(np.zeros((1, 4, 5)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"bias has shape \(3,\), expected \(4,\)"):
        ops.causal_conv1d_fn(np.zeros((1, 4, 5)), np.zeros((4, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="activation must be"):
        ops.causal_conv1d_fn(np.zeros((1, 4, 5)), np.zeros((4, 2)), activation="relu")
    with pytest.raises(ValueError, match=r"conv_state has shape \(1, 4, 1\), expected \(1, 4, >= 2\)"):
        ops.causal_conv1d_update(np.zeros((1, 4)), np.zeros((1, 4, 1)), np.zeros((4, 3)))


# ---------------------------------------------------------------- the peers' other arguments
# seq_idx, initial_states and final states of causal_conv1d_fn; cache_seqlens and
# conv_state_indices of causal_conv1d_update; the multi-head layout and state_batch_indices of
# selective_state_update. Each against a scalar loop written from causal-conv1d's and mamba_ssm's
# documented semantics, for the readable functions and for the Numba twins (same tolerances as
# above for ops; 2e-5 of the scale for float32 Numba, whose exp is within 2 ulp).

IMPLS = ["ops", "numba"]
IMPL_TOL = {("ops", np.float32): 5e-6, ("ops", np.float64): 1e-12,
            ("numba", np.float32): 2e-5, ("numba", np.float64): 1e-12}


def impl_module(impl):
    if impl == "ops":
        return ops
    pytest.importorskip("numba")
    from minimamba.kernels import cpu
    return cpu


def plain_conv_states(x, weight, bias, silu, seq_idx, initial_states):
    """causal_conv1d_fn with seq_idx / initial_states, one scalar at a time; returns (out, final_states)."""
    b, d, l = x.shape
    k = weight.shape[1]
    out = np.zeros((b, d, l))
    final = np.zeros((b, d, k - 1))
    for i in range(b):
        for c in range(d):
            def value(src):  # input at position src (negative: the initial states), and its sequence
                if src >= 0:
                    return float(x[i, c, src]), None if seq_idx is None else int(seq_idx[i, src])
                if initial_states is None:
                    return 0.0, None
                return float(initial_states[i, c, k - 1 + src]), None if seq_idx is None else int(seq_idx[i, 0])
            for t in range(l):
                acc = 0.0 if bias is None else float(bias[c])
                for j in range(k):
                    v, seq = value(t - (k - 1) + j)
                    if seq_idx is None or seq == int(seq_idx[i, t]):
                        acc += float(weight[c, j]) * v
                if seq_idx is not None and seq_idx[i, t] < 0:
                    acc = 0.0
                out[i, c, t] = plain_silu(acc) if silu else acc
            for j in range(k - 1):
                final[i, c, j] = value(l - (k - 1) + j)[0]
    return out, final


@st.composite
def conv_state_problems(draw):
    x, weight, bias, activation, dtype = draw(conv_problems())
    b, d, l = x.shape
    k = weight.shape[1]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    initial_states = rng.standard_normal((b, d, k - 1)).astype(dtype) if draw(st.booleans()) else None
    seq_idx = None
    if draw(st.booleans()):  # packed sequences: non-decreasing ids, maybe a padded (-1) tail
        starts = np.sort(rng.integers(0, 3, (b, l)), axis=1).astype(np.int32)
        pad = draw(st.integers(0, l - 1))
        seq_idx = starts if pad == 0 else np.concatenate([starts[:, :l - pad], np.full((b, pad), -1, np.int32)], 1)
    return x, weight, bias, activation, dtype, seq_idx, initial_states


@pytest.mark.parametrize("impl", IMPLS)
@settings(deadline=None, max_examples=40)
@given(conv_state_problems(), st.booleans())
def test_causal_conv1d_fn_states_and_seq_idx_against_plain_loop(impl, problem, into_out):
    x, weight, bias, activation, dtype, seq_idx, initial_states = problem
    k = weight.shape[1]
    want, want_final = plain_conv_states(x.astype(np.float64), weight.astype(np.float64),
                                         None if bias is None else bias.astype(np.float64), activation is not None,
                                         seq_idx, None if initial_states is None else initial_states.astype(np.float64))
    fn = impl_module(impl).causal_conv1d_fn
    tol = IMPL_TOL[impl, dtype] * max(1.0, float(np.abs(want).max()))
    if seq_idx is not None:  # final states are undefined across packed sequences, as in causal-conv1d
        out = fn(x, weight, bias, seq_idx=seq_idx, initial_states=initial_states, activation=activation)
        assert out.dtype == dtype
        assert_close(f"{impl} causal_conv1d_fn seq_idx", out, want, tol)
        with pytest.raises(ValueError, match="seq_idx"):
            fn(x, weight, bias, seq_idx=seq_idx, return_final_states=True)
        return
    final_out = np.full((x.shape[0], x.shape[1], k - 1), np.nan, dtype=dtype) if into_out else None
    out, final = fn(x, weight, bias, initial_states=initial_states, return_final_states=True,
                    final_states_out=final_out, activation=activation)
    assert out.dtype == dtype and final.dtype == dtype and (final is final_out or not into_out)
    assert_close(f"{impl} causal_conv1d_fn initial_states", out, want, tol)
    np.testing.assert_array_equal(final, want_final.astype(dtype))  # the last k-1 inputs, exactly


def plain_conv_update(x, conv_state, weight, bias, silu, cache_seqlens, indices):
    """causal_conv1d_update, scalar loops; returns (out, the new conv_state)."""
    b, d, l = x.shape
    k = weight.shape[1]
    s = conv_state.shape[2]
    state = conv_state.astype(np.float64)
    out = np.zeros((b, d, l))
    for i in range(b):
        row = i if indices is None else int(indices[i])
        if row < 0:
            continue  # a padded batch row: output 0, no state touched
        for c in range(d):
            if cache_seqlens is None:  # in order, oldest first
                seen = list(state[row, c]) + [float(v) for v in x[i, c]]
                first = s - (k - 1)
            else:  # a ring: input m at slot m % s
                m = int(cache_seqlens[i])
                seen = [state[row, c, (m - (k - 1) + j) % s] for j in range(k - 1)] + [float(v) for v in x[i, c]]
                first = 0
            for t in range(l):
                acc = 0.0 if bias is None else float(bias[c])
                for j in range(k):
                    acc += float(weight[c, j]) * seen[first + t + j]
                out[i, c, t] = plain_silu(acc) if silu else acc
            if cache_seqlens is None:
                state[row, c] = seen[-s:]
            else:
                for t in range(l):
                    state[row, c, (m + t) % s] = float(x[i, c, t])
    return out, state


@pytest.mark.parametrize("impl", IMPLS)
@settings(deadline=None, max_examples=40)
@given(conv_problems(), st.data())
def test_causal_conv1d_update_ring_and_indices_against_plain_loop(impl, problem, data):
    x, weight, bias, activation, dtype = problem
    b, d, l = x.shape
    k = weight.shape[1]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    s = max(k - 1, 1) + data.draw(st.integers(0, 3))
    ring = data.draw(st.booleans())
    cache_seqlens = rng.integers(0, 50, b).astype(np.int32) if ring else None
    indices = None
    rows = b
    if data.draw(st.booleans()):  # continuous batching: rows picked from a bigger state, some padded
        rows = b + data.draw(st.integers(0, 3))
        indices = rng.permutation(rows)[:b].astype(np.int32)
        indices[rng.random(b) < 0.3] = -1
    conv_state = rng.standard_normal((rows, d, s)).astype(dtype)
    want, want_state = plain_conv_update(x, conv_state, weight.astype(np.float64),
                                         None if bias is None else bias.astype(np.float64),
                                         activation is not None, cache_seqlens, indices)
    single = l == 1 and data.draw(st.booleans())
    out = impl_module(impl).causal_conv1d_update(x[:, :, 0] if single else x, conv_state, weight, bias,
                                                 activation=activation, cache_seqlens=cache_seqlens,
                                                 conv_state_indices=indices)
    out = out[:, :, None] if single else out
    assert out.dtype == dtype
    assert_close(f"{impl} causal_conv1d_update ring={ring} indices={indices is not None}", out, want,
                 IMPL_TOL[impl, dtype] * max(1.0, float(np.abs(want).max())))
    np.testing.assert_array_equal(conv_state, want_state.astype(dtype))  # inputs are stored exactly


def plain_state_update_heads(state, x, dt, A, B, C, D, z, dt_bias, softplus, indices):
    """mamba_ssm's multi-head selective_state_update, scalar loops; returns (out, the new state)."""
    rows, h, p, n = state.shape
    b, g = x.shape[0], B.shape[1]
    new = state.astype(np.float64)
    out = np.zeros((b, h, p))
    for i in range(b):
        row = i if indices is None else int(indices[i])
        if row < 0:
            continue
        for hh in range(h):
            grp = hh // (h // g)
            for q in range(p):
                delta = float(dt[i, hh, q]) + (0.0 if dt_bias is None else float(dt_bias[hh, q]))
                delta = plain_softplus(delta) if softplus else delta
                y = 0.0
                for s in range(n):
                    new[row, hh, q, s] = (math.exp(delta * float(A[hh, q, s])) * new[row, hh, q, s]
                                          + delta * float(B[i, grp, s]) * float(x[i, hh, q]))
                    y += float(C[i, grp, s]) * new[row, hh, q, s]
                if D is not None:
                    y += float(D[hh, q]) * float(x[i, hh, q])
                if z is not None:
                    y *= plain_silu(float(z[i, hh, q]))
                out[i, hh, q] = y
    return out, new


@pytest.mark.parametrize("impl", IMPLS)
@settings(deadline=None, max_examples=40)
@given(st.data())
def test_selective_state_update_heads_and_indices_against_plain_loop(impl, data):
    """Multi-head (b, h, p, n) and, flattened, the single-head grouped layout; optional state_batch_indices."""
    draw = data.draw
    b, g = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2]))
    h, p, n = g * draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    dtype = draw(DTYPES)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    indices, rows = None, b
    if draw(st.booleans()):
        rows = b + draw(st.integers(0, 3))
        indices = rng.permutation(rows)[:b].astype(np.int64)
        indices[rng.random(b) < 0.3] = -1
    softplus = draw(st.booleans())
    args = dict(
        x=rng.standard_normal((b, h, p)), dt=rng.standard_normal((b, h, p)) * 0.5 + (0.0 if softplus else 1.0),
        A=-np.exp(rng.standard_normal((h, p, n)) * 0.5), B=rng.standard_normal((b, g, n)),
        C=rng.standard_normal((b, g, n)),
        D=rng.standard_normal((h, p)) if draw(st.booleans()) else None,
        z=rng.standard_normal((b, h, p)) if draw(st.booleans()) else None,
        dt_bias=rng.uniform(0, 0.5, (h, p)) if draw(st.booleans()) else None)
    if not softplus:
        args["dt"] = np.abs(args["dt"])
    args = {k: (None if v is None else v.astype(dtype)) for k, v in args.items()}
    state = rng.standard_normal((rows, h, p, n)).astype(dtype)
    want, want_state = plain_state_update_heads(state, **args, softplus=softplus, indices=indices)
    fn = impl_module(impl).selective_state_update
    heads = draw(st.booleans())
    if heads:
        out = fn(state, **args, dt_softplus=softplus, state_batch_indices=indices)
    else:  # the same problem in the single-head layout: channels h*p, B/C grouped over channels
        flat = {k: (None if v is None else v.reshape(v.shape[:-2] + (h * p,) if k != "A" else (h * p, n)))
                for k, v in args.items() if k not in ("B", "C")}
        flat_state = state.reshape(rows, h * p, n)  # a view: updated in place
        out = fn(flat_state, **flat, B=args["B"], C=args["C"], dt_softplus=softplus,
                 state_batch_indices=indices).reshape(b, h, p)
    assert out.dtype == dtype and out.shape == (b, h, p)
    tol = IMPL_TOL[impl, dtype]
    assert_close(f"{impl} state_update heads={heads} out", out, want, tol * max(1.0, float(np.abs(want).max())))
    assert_close(f"{impl} state_update heads={heads} state", state, want_state,
                 tol * max(1.0, float(np.abs(want_state).max())))


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_head_state_that_cannot_be_flattened_as_a_view_is_still_updated_in_place(impl):
    rng = np.random.default_rng(0)
    b, h, p, n = 2, 4, 3, 5
    state = rng.standard_normal((b, p, h, n)).transpose(0, 2, 1, 3)  # (b, h, p, n); reshape must copy
    contiguous = np.ascontiguousarray(state)
    x = rng.standard_normal((b, h, p))
    A = -np.exp(rng.standard_normal((h, p, n)))
    B = rng.standard_normal((b, 2, n))
    out = impl_module(impl).selective_state_update(state, x, x, A, B, B)
    want = ops.selective_state_update(contiguous, x, x, A, B, B)
    assert_close(f"{impl} strided state out", out, want, 1e-12)
    assert_close(f"{impl} strided state", state, contiguous, 1e-12)
