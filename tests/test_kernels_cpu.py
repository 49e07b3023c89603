"""The Numba CPU kernels (minimamba.kernels.cpu) against their readable twins in minimamba.ops.

Ground truth is the readable function run in float64 on the same inputs. Tolerances:
  float64 kernels: 1e-10 relative to the output's scale: both sides compute in
      float64; only summation order and exp/log1p rounding (~1e-16 each) differ.
  float32 kernels: 2e-5 relative to the output's scale: float32 epsilon is 1.2e-7,
      the custom exp is within 2 ulp, and a scan of up to 40 steps compounds a few
      dozen roundings; the readable float32 path shows errors of the same order.
Every comparison prints the max abs and rel error.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from minimamba import ops  # noqa: E402
from minimamba.kernels import cpu  # noqa: E402

RTOL = {np.float32: 2e-5, np.float64: 1e-10}


def check(name, got, want, dtype):
    got64, want64 = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    scale = max(1.0, float(np.abs(want64).max())) if want64.size else 1.0
    err = float(np.abs(got64 - want64).max()) if want64.size else 0.0
    print(f"{name} {np.dtype(dtype).name}: max abs err {err:.3e}, rel to scale {err / scale:.3e}")
    assert got.shape == want.shape, (got.shape, want.shape)
    assert err <= RTOL[dtype] * scale, f"{name}: max abs err {err:.3e} > {RTOL[dtype]:.0e} x scale {scale:.3g}"


def maybe_strided(rng, shape, dtype, strided):
    """An array of `shape`, either contiguous or a transposed view of (b, l, d) memory, as the model passes."""
    a = rng.standard_normal(shape)
    if strided and len(shape) == 3:
        a = np.ascontiguousarray(a.transpose(0, 2, 1)).transpose(0, 2, 1)
    return a.astype(dtype)


dims = st.fixed_dictionaries(dict(
    b=st.integers(1, 3), d=st.integers(1, 70), l=st.integers(1, 40), n=st.integers(1, 17),
    dtype=st.sampled_from([np.float32, np.float64]), strided=st.booleans(), seed=st.integers(0, 2 ** 16)))


def scan_inputs(p, with_D, with_z, with_bias, with_h0, softplus):
    """Inputs in the model's range: delta > 0 after the optional softplus, A < 0, so the state decays."""
    rng = np.random.default_rng(p["seed"])
    b, d, l, n, dt_ = p["b"], p["d"], p["l"], p["n"], p["dtype"]
    raw = maybe_strided(rng, (b, d, l), np.float64, p["strided"])
    return dict(
        u=maybe_strided(rng, (b, d, l), dt_, p["strided"]),
        delta=(raw - 1.0 if softplus else np.exp(raw - 2.0)).astype(dt_),
        A=-np.exp(rng.standard_normal((d, n))).astype(dt_),
        B=maybe_strided(rng, (b, n, l), dt_, p["strided"]),
        C=maybe_strided(rng, (b, n, l), dt_, p["strided"]),
        D=rng.standard_normal(d).astype(dt_) if with_D else None,
        z=maybe_strided(rng, (b, d, l), dt_, p["strided"]) if with_z else None,
        delta_bias=(rng.standard_normal(d) if softplus else rng.uniform(0, 0.1, d)).astype(dt_) if with_bias else None,
        initial_state=rng.standard_normal((b, d, n)).astype(dt_) if with_h0 else None,
    )


def as64(kwargs):
    return {k: (None if v is None else v.astype(np.float64)) for k, v in kwargs.items()}


@settings(deadline=None, max_examples=40)
@given(p=dims, with_D=st.booleans(), with_z=st.booleans(), with_bias=st.booleans(), with_h0=st.booleans(),
       softplus=st.booleans())
def test_selective_scan_matches_reference(p, with_D, with_z, with_bias, with_h0, softplus):
    kw = scan_inputs(p, with_D, with_z, with_bias, with_h0, softplus)
    h0_before = None if kw["initial_state"] is None else kw["initial_state"].copy()
    out, last = cpu.selective_scan_fn(**kw, delta_softplus=softplus, return_last_state=True)
    want_out, want_last = ops.selective_scan_ref(**as64(kw), delta_softplus=softplus, return_last_state=True)
    assert out.dtype == p["dtype"] and last.dtype == p["dtype"]
    check("scan out", out, want_out, p["dtype"])
    check("scan last_state", last, want_last, p["dtype"])
    if h0_before is not None:
        np.testing.assert_array_equal(kw["initial_state"], h0_before)  # initial_state is read, not written
    only_out = cpu.selective_scan_fn(**kw, delta_softplus=softplus)
    np.testing.assert_array_equal(only_out, out)


@settings(deadline=None, max_examples=40)
@given(p=dims, with_D=st.booleans(), with_z=st.booleans(), with_bias=st.booleans(), softplus=st.booleans())
def test_selective_state_update_matches_reference(p, with_D, with_z, with_bias, softplus):
    kw = scan_inputs(p, with_D, with_z, with_bias, True, softplus)
    t = p["l"] - 1
    args = dict(x=kw["u"][..., t], dt=kw["delta"][..., t], A=kw["A"], B=kw["B"][..., t], C=kw["C"][..., t],
                D=kw["D"], z=None if kw["z"] is None else kw["z"][..., t], dt_bias=kw["delta_bias"])
    state = kw["initial_state"].copy()
    want_state = kw["initial_state"].astype(np.float64)
    out = cpu.selective_state_update(state, **args, dt_softplus=softplus)
    want = ops.selective_state_update(want_state, **as64(args), dt_softplus=softplus)
    assert out.dtype == p["dtype"]
    check("state_update out", out, want, p["dtype"])
    check("state_update state", state, want_state, p["dtype"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_update_parallel_and_serial_versions_both_match_reference(dtype):
    """Big b * d * n takes the prange version, small the serial one; both must meet the reference bar.

    They are compiled separately (fastmath may order the sums differently), so they
    agree to rounding, not bit for bit. Each is called directly, whatever its size.
    """
    rng = np.random.default_rng(3)
    b, d, n = 4, 1100, 16  # 70400 >= PARALLEL_MIN
    assert b * d * n >= cpu.PARALLEL_MIN
    state = rng.standard_normal((b, d, n)).astype(dtype)
    args = [rng.standard_normal((b, d)).astype(dtype), rng.standard_normal((b, d)).astype(dtype),
            -np.exp(rng.standard_normal((d, n))).astype(dtype),
            rng.standard_normal((b, n)).astype(dtype), rng.standard_normal((b, n)).astype(dtype)]
    want_state = state.astype(np.float64)
    want = ops.selective_state_update(want_state, *[a.astype(np.float64) for a in args], dt_softplus=True)
    for name in ("state_update", "state_update_par"):
        s, y = state.copy(), np.empty((b, d), dtype=dtype)
        cpu._core(name, np.dtype(dtype))(
            s, *args, cpu._dummy(1, dtype), cpu._dummy(2, dtype), cpu._dummy(1, dtype), y, False, False, False, True)
        check(f"{name} out", y, want, dtype)
        check(f"{name} state", s, want_state, dtype)


def test_serial_and_parallel_versions_are_cached_apart():
    """Numba files cached code by function name and signature, not flags: the twins need their own names."""
    names = {cpu._CORES[k].py_func.__qualname__ for k in cpu._CORES}
    assert len(names) == len(cpu._CORES), names
    assert cpu._CORES["conv_par"].targetoptions.get("parallel") and not cpu._CORES["conv"].targetoptions.get("parallel")


@settings(deadline=None, max_examples=40)
@given(p=dims, k=st.integers(1, 5), with_bias=st.booleans(), activation=st.sampled_from([None, "silu", "swish"]))
def test_causal_conv1d_fn_matches_reference(p, k, with_bias, activation):
    rng = np.random.default_rng(p["seed"])
    b, d, l, dt_ = p["b"], p["d"], p["l"], p["dtype"]
    x = maybe_strided(rng, (b, d, l), dt_, p["strided"])
    weight = rng.standard_normal((d, k)).astype(dt_)
    bias = rng.standard_normal(d).astype(dt_) if with_bias else None
    out = cpu.causal_conv1d_fn(x, weight, bias, activation=activation)
    want = ops.causal_conv1d_fn(x.astype(np.float64), weight.astype(np.float64),
                                None if bias is None else bias.astype(np.float64), activation=activation)
    assert out.dtype == dt_
    check("conv", out, want, dt_)


@settings(deadline=None, max_examples=40)
@given(p=dims, k=st.integers(1, 5), extra=st.integers(0, 3), steps=st.integers(0, 4), with_bias=st.booleans(),
       activation=st.sampled_from([None, "silu"]))
def test_causal_conv1d_update_matches_reference(p, k, extra, steps, with_bias, activation):
    """steps = 0 is the 2-D (b, d) form; 1..4 the (b, d, l) form. The state is s = k - 1 + extra wide."""
    rng = np.random.default_rng(p["seed"])
    b, d, dt_ = p["b"], p["d"], p["dtype"]
    s = max(1, k - 1 + extra)
    x = rng.standard_normal((b, d) if steps == 0 else (b, d, steps)).astype(dt_)
    state = rng.standard_normal((b, d, s)).astype(dt_)
    weight = rng.standard_normal((d, k)).astype(dt_)
    bias = rng.standard_normal(d).astype(dt_) if with_bias else None
    want_state = state.astype(np.float64)
    out = cpu.causal_conv1d_update(x, state, weight, bias, activation=activation)
    want = ops.causal_conv1d_update(x.astype(np.float64), want_state, weight.astype(np.float64),
                                    None if bias is None else bias.astype(np.float64), activation=activation)
    check("conv_update out", out, want, dt_)
    check("conv_update state", state, want_state, dt_)


@pytest.mark.parametrize("b, d, l, k, s", [(1, 1536, 50, 4, 4),  # a prefill chunk through the cache: parallel
                                           (2, 5, 2, 4, 6),  # l < s: the state shifts
                                           (1, 7, 9, 3, 2)])  # l > s: the state is the last s inputs
def test_causal_conv1d_update_long_chunks(b, d, l, k, s):
    """A chunk of many tokens through the conv state, serial and parallel, strided x as the model passes it."""
    rng = np.random.default_rng(l)
    x = maybe_strided(rng, (b, d, l), np.float32, True)
    state = rng.standard_normal((b, d, s)).astype(np.float32)
    weight = rng.standard_normal((d, k)).astype(np.float32)
    bias = rng.standard_normal(d).astype(np.float32)
    want_state = state.astype(np.float64)
    want = ops.causal_conv1d_update(x.astype(np.float64), want_state, weight.astype(np.float64),
                                    bias.astype(np.float64), activation="silu")
    out = cpu.causal_conv1d_update(x, state, weight, bias, activation="silu")
    check("conv_update out", out, want, np.float32)
    check("conv_update state", state, want_state, np.float32)


def test_fast_exp_accuracy():
    """The float32 exp used inside the kernels, over its whole range, against float64 exp."""
    from numba import njit

    @njit
    def apply(a, out):
        for i in range(a.size):
            out[i] = cpu.fast_exp(a[i])

    a = np.concatenate([np.linspace(-87, 88.7, 200001), [-1e-30, 0.0, 1e-30]]).astype(np.float32)
    out = np.empty_like(a)
    apply(a, out)
    want = np.exp(a.astype(np.float64))
    rel = np.abs(out - want) / want
    print(f"fast_exp max rel err {rel.max():.3e} (float32 eps 1.19e-7)")
    assert rel.max() < 3e-7  # within ~2 ulp
    special = np.array([-np.inf, -200.0, 100.0, np.inf, np.nan], dtype=np.float32)
    out = np.empty_like(special)
    apply(special, out)
    assert out[0] == 0 and out[1] == 0 and out[2] == np.inf and out[3] == np.inf and np.isnan(out[4])


@settings(deadline=None, max_examples=30)
@given(p=dims, groups=st.sampled_from([(1, 2), (2, 2), (2, 4), (4, 1), (2, 3), ("dn", "dn")]),
       with_D=st.booleans(), with_z=st.booleans(), softplus=st.booleans())
def test_grouped_and_fixed_B_C_match_reference(p, groups, with_D, with_z, softplus):
    """Grouped B/C run the core once per group of channels (B and C may have different group
    counts); counts neither of which divides the other, and (d, n) B/C, take the readable path."""
    kw = scan_inputs(p, with_D, with_z, False, False, softplus)
    rng = np.random.default_rng(p["seed"] + 1)
    b, l, n = p["b"], p["l"], p["n"]
    lcm = int(np.lcm(*(g if g != "dn" else 1 for g in groups)))
    d = lcm * max(1, p["d"] // lcm)
    raw = rng.standard_normal((b, d, l))
    kw.update(u=rng.standard_normal((b, d, l)).astype(p["dtype"]),
              delta=(raw - 1.0 if softplus else np.exp(raw - 2.0)).astype(p["dtype"]),
              A=-np.exp(rng.standard_normal((d, n))).astype(p["dtype"]),
              D=None if kw["D"] is None else rng.standard_normal(d).astype(p["dtype"]),
              z=None if kw["z"] is None else rng.standard_normal((b, d, l)).astype(p["dtype"]))
    for name, g in zip("BC", groups):
        shape = (d, n) if g == "dn" else (b, n, l) if g == 1 else (b, g, n, l)
        kw[name] = rng.standard_normal(shape).astype(p["dtype"])
    got, got_state = cpu.selective_scan_fn(**kw, delta_softplus=softplus, return_last_state=True)
    want, want_state = ops.selective_scan_ref(**as64(kw), delta_softplus=softplus, return_last_state=True)
    check(f"grouped scan {groups}", got, want, p["dtype"])
    check(f"grouped scan {groups} state", got_state, want_state, p["dtype"])


def test_mixed_dtypes_compute_in_float64_and_return_u_dtype():
    rng = np.random.default_rng(6)
    u = rng.standard_normal((1, 4, 5)).astype(np.float32)
    delta = rng.standard_normal((1, 4, 5))  # float64: the whole computation is float64
    A = -np.ones((4, 2))
    B = rng.standard_normal((1, 2, 5))
    out, last = cpu.selective_scan_fn(u, delta, A, B, B, return_last_state=True)
    want, want_last = ops.selective_scan_ref(u, delta, A, B, B, return_last_state=True)
    assert out.dtype == np.float32 and last.dtype == np.float64
    np.testing.assert_allclose(out, want, rtol=1e-6)
    np.testing.assert_allclose(last, want_last, rtol=1e-12)


@pytest.mark.parametrize("call, message", [
    (lambda z: cpu.selective_scan_fn(z((1, 4, 5)), z((1, 4, 6)), z((4, 2)), z((1, 2, 5)), z((1, 2, 5))), "delta"),
    (lambda z: cpu.selective_scan_fn(z((1, 4, 5)), z((1, 4, 5)), z((3, 2)), z((1, 2, 5)), z((1, 2, 5))), "A"),
    (lambda z: cpu.selective_scan_fn(z((1, 4, 5)), z((1, 4, 5)), z((4, 2)), z((1, 3, 5)), z((1, 2, 5))), "B"),
    (lambda z: cpu.selective_scan_fn(z((1, 4, 5)), z((1, 4, 5)), z((4, 2)), z((1, 2, 5)), z((1, 2, 5)),
                                     initial_state=z((1, 4, 3))), "initial_state"),
    (lambda z: cpu.selective_state_update(z((1, 4, 2)), z((1, 4)), z((1, 4)), z((4, 2)), z((1, 3)), z((1, 2))), "B"),
    (lambda z: cpu.selective_state_update(z((1, 4, 2)), z((1, 5)), z((1, 4)), z((4, 2)), z((1, 2)), z((1, 2))), "x"),
    (lambda z: cpu.causal_conv1d_fn(z((1, 4, 5)), z((3, 2))), "weight"),
    (lambda z: cpu.causal_conv1d_fn(z((1, 4, 5)), z((4, 2)), activation="relu"), "activation"),
    (lambda z: cpu.causal_conv1d_update(z((1, 4)), z((1, 4, 1)), z((4, 4))), "conv_state"),
    (lambda z: cpu.causal_conv1d_update(z((1, 4)), z((1, 4, 3)), z((4, 4)), z((5,))), "bias"),
])
def test_bad_shapes_get_named_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(lambda shape: np.zeros(shape, dtype=np.float32))


@settings(deadline=None, max_examples=30)
@given(rows=st.integers(1, 300), d=st.integers(1, 300), dtype=st.sampled_from([np.float32, np.float64]),
       lead=st.sampled_from([(), (1,), (2,)]), seed=st.integers(0, 2 ** 16))
def test_rms_norm_matches_reference(rows, d, dtype, lead, seed):
    """Serial (small) and parallel (rows * d >= PARALLEL_MIN) versions, 2-D and 3-D inputs."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((*lead, rows, d)) * rng.uniform(0.01, 100)).astype(dtype)
    weight = rng.standard_normal(d).astype(dtype)
    out = cpu.rms_norm(x, weight, 1e-5)
    want = ops.rms_norm(x.astype(np.float64), weight.astype(np.float64), 1e-5)
    assert out.dtype == dtype
    check("rms_norm", out, want, dtype)


def test_rms_norm_refuses_mismatched_weight():
    x = np.ones((2, 3, 8), dtype=np.float32)
    for f in (cpu.rms_norm, ops.rms_norm):
        with pytest.raises(ValueError, match="weight must be"):
            f(x, np.ones(7, dtype=np.float32))
