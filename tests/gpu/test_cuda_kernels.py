"""Every CUDA kernel against its readable NumPy twin in float64 (minimamba.ops).

Shapes are small and odd (b * d = 42 rows over 32-thread blocks, l = 13 over
chunks of 5), so the last block and the last chunk are partial. Tolerances:
float32 kernels 2e-5 * (1 + max|ref|) -- float32 rounding (6e-8) grown over
13 steps of a 3-term recurrence with exp, with a margin for the GPU's fast exp
(ex2.approx, ~2 ulp); float64 kernels 1e-12 * (1 + max|ref|).
"""

import itertools

import numpy as np
import pytest

from gpu_helpers import GPU, assert_close
from minimamba import ops

F32_TOL = 2e-5
F64_TOL = 1e-12
b, d, l, n, k = 2, 21, 13, 3, 4


def scan_inputs(rng, dtype, bc="selective", groups=3):
    """Random scan arguments in NumPy, dtype `dtype`; B and C selective, grouped or fixed."""
    shape_bc = {"selective": (b, n, l), "grouped": (b, groups, n, l), "fixed": (d, n)}[bc]
    args = dict(
        u=rng.standard_normal((b, d, l)), delta=rng.standard_normal((b, d, l)) - 1.0,
        A=-np.exp(rng.standard_normal((d, n))), B=rng.standard_normal(shape_bc), C=rng.standard_normal(shape_bc),
        D=rng.standard_normal(d), z=rng.standard_normal((b, d, l)), delta_bias=rng.standard_normal(d) * 0.5,
        initial_state=rng.standard_normal((b, d, n)),
    )
    return {name: a.astype(dtype) for name, a in args.items()}


def run_scan(kc, device, args, **kw):
    to_dev, to_host = device
    out, last = kc.selective_scan_fn(**{name: to_dev(a) for name, a in args.items()},
                                     return_last_state=True, **kw)
    return to_host(out), to_host(last)


def reference_scan(args, **kw):
    args64 = {name: None if a is None else a.astype(np.float64) for name, a in args.items()}
    for name in ("B", "C"):
        if args64[name].ndim == 2:
            # NOTE: ops.selective_scan_ref indexes a fixed (d, n) B or C along l and fails on it; the same
            # values as a grouped (b, d, n, l) array (one group per channel) give the reference its answer.
            args64[name] = np.ascontiguousarray(np.broadcast_to(args64[name][None, :, :, None], (b, d, n, l)))
    return ops.selective_scan_ref(**args64, return_last_state=True, **kw)


@pytest.mark.parametrize("version", ["v1", "chunked"])
@pytest.mark.parametrize("has_D,has_z,has_bias,has_init", list(itertools.product([False, True], repeat=4)))
def test_scan_float32(kc, device, rng, version, has_D, has_z, has_bias, has_init):
    args = scan_inputs(rng, np.float32)
    for name, keep in (("D", has_D), ("z", has_z), ("delta_bias", has_bias), ("initial_state", has_init)):
        if not keep:
            args[name] = None
    out, last = run_scan(kc, device, args, delta_softplus=True, version=version, chunk_size=5)
    ref, ref_last = reference_scan(args, delta_softplus=True)
    assert out.dtype == np.float32 and last.dtype == np.float32
    assert_close(f"scan {version} out", out, ref, F32_TOL)
    assert_close(f"scan {version} last_state", last, ref_last, F32_TOL)


@pytest.mark.parametrize("version", ["v1", "chunked"])
@pytest.mark.parametrize("bc", ["selective", "grouped", "fixed"])
def test_scan_float64_and_b_c_layouts(kc, device, rng, version, bc):
    args = scan_inputs(rng, np.float64, bc=bc)
    out, last = run_scan(kc, device, args, delta_softplus=True, version=version, chunk_size=5)
    ref, ref_last = reference_scan(args, delta_softplus=True)
    assert out.dtype == np.float64
    assert_close(f"scan {version} {bc} float64 out", out, ref, F64_TOL)
    assert_close(f"scan {version} {bc} float64 last_state", last, ref_last, F64_TOL)


@pytest.mark.parametrize("chunk_size", [1, 5, 13, 20, None])
def test_scan_chunk_sizes(kc, device, rng, chunk_size):
    args = scan_inputs(rng, np.float32)
    out, last = run_scan(kc, device, args, delta_softplus=True, version="chunked", chunk_size=chunk_size)
    ref, ref_last = reference_scan(args, delta_softplus=True)
    assert_close(f"chunked, chunk_size={chunk_size}", out, ref, F32_TOL)
    assert_close(f"chunked last_state, chunk_size={chunk_size}", last, ref_last, F32_TOL)


@pytest.mark.parametrize("version", [None, "v1", "chunked"])
def test_scan_without_softplus_and_without_last_state(kc, device, rng, version):
    args = scan_inputs(rng, np.float32)
    args["delta"] = np.abs(args["delta"]) * 0.3  # a plain (positive) step size
    args["delta_bias"] = None
    to_dev, to_host = device
    out = kc.selective_scan_fn(**{name: to_dev(a) for name, a in args.items()}, version=version)
    ref, _ = reference_scan(args)
    assert_close(f"scan {version} no softplus", to_host(out), ref, F32_TOL)


def test_scan_mixed_dtypes_compute_in_float64(kc, device, rng):
    args = scan_inputs(rng, np.float32)
    args["A"] = args["A"].astype(np.float64)  # one float64 input: float64 arithmetic, output in u's dtype
    out, last = run_scan(kc, device, args, delta_softplus=True)
    ref, ref_last = reference_scan(args, delta_softplus=True)
    assert out.dtype == np.float32 and last.dtype == np.float64
    assert_close("mixed dtypes out", out, ref, 1e-6)  # only the final cast to float32 rounds
    assert_close("mixed dtypes last_state", last, ref_last, F64_TOL)


@pytest.mark.parametrize("has_D,has_z,has_bias", list(itertools.product([False, True], repeat=3)))
@pytest.mark.parametrize("grouped", [False, True])
def test_state_update(kc, device, rng, has_D, has_z, has_bias, grouped):
    to_dev, to_host = device
    shape_bc = (b, 3, n) if grouped else (b, n)
    state = rng.standard_normal((b, d, n)).astype(np.float32)
    args = dict(x=rng.standard_normal((b, d)), dt=rng.standard_normal((b, d)) - 1.0,
                A=-np.exp(rng.standard_normal((d, n))), B=rng.standard_normal(shape_bc),
                C=rng.standard_normal(shape_bc), D=rng.standard_normal(d) if has_D else None,
                z=rng.standard_normal((b, d)) if has_z else None,
                dt_bias=rng.standard_normal(d) if has_bias else None)
    args = {name: None if a is None else a.astype(np.float32) for name, a in args.items()}
    ref_state = state.astype(np.float64)
    ref = ops.selective_state_update(ref_state, **{name: None if a is None else a.astype(np.float64)
                                                   for name, a in args.items()}, dt_softplus=True)
    dev_state = to_dev(state)
    out = kc.selective_state_update(dev_state, **{name: to_dev(a) for name, a in args.items()}, dt_softplus=True)
    assert out.dtype == np.float32
    assert_close("state_update out", to_host(out), ref, F32_TOL)
    assert_close("state_update state (in place)", to_host(dev_state), ref_state, F32_TOL)


def test_state_update_steps_equal_the_scan(kc, device, rng):
    """l decode steps through selective_state_update give the scan's outputs and final state."""
    to_dev, to_host = device
    args = scan_inputs(rng, np.float64)
    state = to_dev(args["initial_state"].copy())
    outs = []
    for t in range(l):
        outs.append(to_host(kc.selective_state_update(
            state, to_dev(args["u"][:, :, t]), to_dev(args["delta"][:, :, t]), to_dev(args["A"]),
            to_dev(args["B"][:, :, t]), to_dev(args["C"][:, :, t]), D=to_dev(args["D"]),
            z=to_dev(args["z"][:, :, t]), dt_bias=to_dev(args["delta_bias"]), dt_softplus=True)))
    out, last = run_scan(kc, device, args, delta_softplus=True, version="v1")
    assert_close("state_update x l vs scan", np.stack(outs, axis=-1), out, F64_TOL)
    assert_close("state_update x l vs scan, state", to_host(state), last, F64_TOL)


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("has_bias,activation", [(False, None), (True, None), (True, "silu"), (False, "swish")])
@pytest.mark.parametrize("dtype,tol", [(np.float32, F32_TOL), (np.float64, F64_TOL)])
def test_conv1d(kc, device, rng, width, has_bias, activation, dtype, tol):
    to_dev, to_host = device
    x = rng.standard_normal((b, d, l)).astype(dtype)
    weight = rng.standard_normal((d, width)).astype(dtype)
    bias = rng.standard_normal(d).astype(dtype) if has_bias else None
    out = kc.causal_conv1d_fn(to_dev(x), to_dev(weight), to_dev(bias), activation=activation)
    ref = ops.causal_conv1d_fn(x.astype(np.float64), weight.astype(np.float64),
                               None if bias is None else bias.astype(np.float64), activation=activation)
    assert out.dtype == dtype
    assert_close(f"conv1d k={width} bias={has_bias} {activation}", to_host(out), ref, tol)


@pytest.mark.parametrize("length", [0, 1, 5])  # 0: x of shape (b, d), one step
@pytest.mark.parametrize("extra_state", [0, 1, 3])  # state width k - 1 + extra
@pytest.mark.parametrize("has_bias", [False, True])
def test_conv1d_update(kc, device, rng, length, extra_state, has_bias):
    to_dev, to_host = device
    x = rng.standard_normal((b, d) if length == 0 else (b, d, length)).astype(np.float32)
    weight = rng.standard_normal((d, k)).astype(np.float32)
    bias = rng.standard_normal(d).astype(np.float32) if has_bias else None
    state = rng.standard_normal((b, d, k - 1 + extra_state)).astype(np.float32)
    ref_state = state.astype(np.float64)
    ref = ops.causal_conv1d_update(x.astype(np.float64), ref_state, weight.astype(np.float64),
                                   None if bias is None else bias.astype(np.float64), activation="silu")
    dev_state = to_dev(state)
    out = kc.causal_conv1d_update(to_dev(x), dev_state, to_dev(weight), to_dev(bias), activation="silu")
    assert out.shape == x.shape
    assert_close(f"conv1d_update l={length} s={state.shape[2]}", to_host(out), ref, F32_TOL)
    assert_close(f"conv1d_update state l={length} s={state.shape[2]}", to_host(dev_state), ref_state, 0.0)


def test_conv1d_update_continues_conv1d(kc, device, rng):
    """A sequence fed as [prefix, then steps] through the state equals one pass of causal_conv1d_fn."""
    to_dev, to_host = device
    x = rng.standard_normal((b, d, l))
    weight = rng.standard_normal((d, k))
    full = to_host(kc.causal_conv1d_fn(to_dev(x), to_dev(weight), activation="silu"))
    state = to_dev(np.zeros((b, d, k)))
    parts = [to_host(kc.causal_conv1d_update(to_dev(x[:, :, :6]), state, to_dev(weight), activation="silu"))]
    parts += [to_host(kc.causal_conv1d_update(to_dev(x[:, :, t]), state, to_dev(weight), activation="silu"))[:, :, None]
              for t in range(6, l)]
    assert_close("conv prefix + steps vs one pass", np.concatenate(parts, axis=2), full, F64_TOL)


# ---------------------------------------------------------------- bad input


def test_bad_shapes_are_named(kc, device, rng):
    to_dev, _ = device
    args = {name: to_dev(a) for name, a in scan_inputs(rng, np.float32).items()}
    args["z"] = to_dev(np.zeros((b, d, l + 1), np.float32))
    with pytest.raises(ValueError, match="z has shape"):
        kc.selective_scan_fn(**args)
    with pytest.raises(ValueError, match="conv_state has shape"):
        kc.causal_conv1d_update(to_dev(np.zeros((b, d), np.float32)), to_dev(np.zeros((b, d + 1, k), np.float32)),
                                to_dev(np.zeros((d, k), np.float32)))
    with pytest.raises(ValueError, match="activation"):
        kc.causal_conv1d_fn(to_dev(np.zeros((b, d, l), np.float32)), to_dev(np.zeros((d, k), np.float32)),
                            activation="relu")
    with pytest.raises(ValueError, match="version"):
        kc.selective_scan_fn(**{**args, "z": None}, version="v9")


def test_numpy_arrays_are_refused_on_a_gpu(kc, monkeypatch):
    """On a real GPU a NumPy argument is a TypeError naming it (checked here without one)."""
    monkeypatch.setattr(kc, "SIMULATOR", False)
    with pytest.raises(TypeError, match="u is a NumPy array in host memory"):
        kc._check_array("selective_scan_fn", "u", np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="not a GPU array"):
        kc._check_array("selective_scan_fn", "u", [1.0, 2.0])


def test_the_wrappers_refuse_numpy_end_to_end(kc):
    if not GPU:
        pytest.skip("needs a real GPU (under the simulator NumPy arrays are the device arrays)")
    x = np.zeros((b, d, l), np.float32)
    with pytest.raises(TypeError, match="x is a NumPy array"):
        kc.causal_conv1d_fn(x, np.zeros((d, k), np.float32))


@pytest.mark.parametrize("rows", [1, 5, 70])  # 70: more than the largest compile-time batch (64)
def test_linear(kc, device, rng, monkeypatch, rows):
    to_dev, to_host = device
    monkeypatch.setattr(kc, "THREADS", 8)  # 37 inputs over 8 threads: uneven slices; a fast simulator
    base = rng.standard_normal((rows, 2 * 37))
    x = base[:, ::2]  # a strided (rows, 37) view
    weight = rng.standard_normal((9, 37))
    bias = rng.standard_normal(9)
    for dtype, tol in ((np.float32, F32_TOL), (np.float64, F64_TOL)):
        got = kc.linear(to_dev(base.astype(dtype))[:, ::2], to_dev(weight.astype(dtype)), to_dev(bias.astype(dtype)))
        assert got.dtype == dtype
        assert_close(f"linear rows={rows} {np.dtype(dtype).name}", to_host(got), x @ weight.T + bias, tol)
