"""The kernel lab (kernels/lab/): its versions -- scan v3, linear v2 -- against the readable NumPy twins in
float64, and each lab script's own check run at tiny size.

Same shapes and tolerances as test_cuda_kernels.py (b * d = 42 rows, l = 13 over chunks of 5):
float32 2e-5 * (1 + max|ref|) -- float32 rounding (6e-8) grown over 13 steps of a 3-term
recurrence with exp, with a margin for the GPU's fast exp2 (ex2.approx, ~2 ulp); float64
1e-12 * (1 + max|ref|). The v3 layouts here are small and odd (3 channel lanes, a state split
wider than n = 3, tiles of 3 or 4 steps), so that every block, tile and chunk edge is crossed:
the last block of channels is partial, states are padded, tiles straddle the chunk ends.
"""

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

from gpu_helpers import SIMULATOR, assert_close
from test_cuda_kernels import F32_TOL, F64_TOL, b, d, l, n, reference_scan, scan_inputs

assert n == 3  # the layouts below are chosen around n = 3 (split 4 pads a state)

SMALL = dict(lanes=4, split=2, channels=2, steps=4)  # 8 threads, 8 channels a block: 21 channels = 2 5/8 blocks
LAYOUTS = [
    SMALL,
    dict(lanes=7, split=1, channels=3, steps=3),  # no split: all n states of 3 channels in a thread
    dict(lanes=2, split=4, channels=2, steps=4),  # split wider than n = 3: one state a thread, a padded one
    dict(lanes=3, split=3, channels=2, steps=5),  # split = n, two channels a thread, tiles of 5 = the chunk
]


@pytest.fixture
def scan(kc):
    """kernels/lab/scan.py (imported after kc has set 32-thread blocks for the library's versions)."""
    from minimamba.kernels.lab import scan

    return scan


@pytest.fixture
def v3(scan, monkeypatch):
    """kernels/lab/scan.py with the small v3 layout (a fast simulator, every edge crossed)."""
    monkeypatch.setattr(scan, "V3_LAYOUT", scan.V3Layout(**SMALL))
    return scan


def run_scan(func, device, args, **kw):
    to_dev, to_host = device
    out, last = func(**{name: to_dev(a) for name, a in args.items()}, return_last_state=True, **kw)
    return to_host(out), to_host(last)


# every option on and off: none, all, and all but one (the simulator is slow; interactions come with "all")
OPTION_SETS = [(False,) * 4, (True,) * 4] + [tuple(i != j for i in range(4)) for j in range(4)]


@pytest.mark.parametrize("has_D,has_z,has_bias,has_init", OPTION_SETS)
def test_scan_v3_float32_every_option(v3, device, rng, has_D, has_z, has_bias, has_init):
    args = scan_inputs(rng, np.float32)
    for name, keep in (("D", has_D), ("z", has_z), ("delta_bias", has_bias), ("initial_state", has_init)):
        if not keep:
            args[name] = None
    out, last = run_scan(v3.scan_v3, device, args, delta_softplus=True, chunk_size=5)
    ref, ref_last = reference_scan(args, delta_softplus=True)
    assert out.dtype == np.float32 and last.dtype == np.float32
    assert_close("scan v3 out", out, ref, F32_TOL)
    assert_close("scan v3 last_state", last, ref_last, F32_TOL)


# each layout with a chunking: 1 (a chunk a step), 2 and 5 (partial tiles and chunks), 13 (one chunk: no carry pass),
# None (the automatic choice, several chunks here as V3_MIN_CHUNK is lowered)
LAYOUT_CHUNKS = [(SMALL, 2), (SMALL, 13), (LAYOUTS[1], 1), (LAYOUTS[2], 5), (LAYOUTS[3], None)]


@pytest.mark.parametrize("layout,chunk_size", LAYOUT_CHUNKS,
                         ids=lambda v: "-".join(map(str, v.values())) if isinstance(v, dict) else str(v))
def test_scan_v3_float64_layouts_and_chunks(scan, device, rng, monkeypatch, layout, chunk_size):
    monkeypatch.setattr(scan, "V3_MIN_CHUNK", 4)  # chunk_size=None: several chunks even at l = 13
    args = scan_inputs(rng, np.float64)
    out, last = run_scan(scan.scan_v3, device, args, delta_softplus=True, chunk_size=chunk_size,
                         layout=scan.V3Layout(**layout))
    ref, ref_last = reference_scan(args, delta_softplus=True)
    assert out.dtype == np.float64
    assert_close(f"scan v3 {layout} chunk {chunk_size} out", out, ref, F64_TOL)
    assert_close(f"scan v3 {layout} chunk {chunk_size} last_state", last, ref_last, F64_TOL)


@pytest.mark.parametrize("bc", ["grouped", "fixed", "grouped B, selective C"])
def test_scan_v3_b_c_layouts(v3, device, rng, monkeypatch, bc):
    """Grouped and fixed B and C: a block of channels never straddles a group (fixed: one channel a group)."""
    if bc == "fixed":  # blocks of one channel (the simulator pays for every idle thread)
        monkeypatch.setattr(v3, "V3_LAYOUT", v3.V3Layout(lanes=1, split=2, channels=1, steps=4))
    if bc == "grouped B, selective C":
        args = scan_inputs(rng, np.float64, bc="grouped", groups=7)
        args["C"] = scan_inputs(rng, np.float64)["C"]  # (b, n, l): one group
    else:
        args = scan_inputs(rng, np.float64, bc=bc)
    out, last = run_scan(v3.scan_v3, device, args, delta_softplus=True, chunk_size=7)
    ref, ref_last = reference_scan(args, delta_softplus=True)
    assert_close(f"scan v3 {bc} out", out, ref, F64_TOL)
    assert_close(f"scan v3 {bc} last_state", last, ref_last, F64_TOL)


def test_scan_v3_without_softplus_and_without_last_state(v3, device, rng):
    args = scan_inputs(rng, np.float32)
    args["delta"] = np.abs(args["delta"]) * 0.3  # a plain (positive) step size
    args["delta_bias"] = None
    to_dev, to_host = device
    out = v3.scan_v3(**{name: to_dev(a) for name, a in args.items()}, chunk_size=6)
    ref, _ = reference_scan(args)
    assert_close("scan v3 no softplus", to_host(out), ref, F32_TOL)


def test_the_library_names_the_lab_for_other_versions(kc, device, rng):
    """kernels.cuda runs the library's versions only; asking it for a lab version says where that lives."""
    to_dev, _ = device
    args = {name: to_dev(a) for name, a in scan_inputs(rng, np.float32).items()}
    with pytest.raises(ValueError, match="kernels/lab/scan.py"):
        kc.selective_scan_fn(**args, version="v3")


def test_scan_v3_bad_input_is_named(v3, device, rng, monkeypatch):
    to_dev, _ = device
    args = {name: to_dev(a) for name, a in scan_inputs(rng, np.float32).items()}
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        v3.scan_v3(**args, chunk_size=0)
    monkeypatch.setattr(v3, "V3_SHARED_LIMIT", 100)  # SMALL needs 192 bytes a step in float32
    with pytest.raises(ValueError, match="shared memory"):
        v3.scan_v3(**args)


def test_scan_v3_halves_its_tiles_to_fit_shared_memory(v3, device, rng, monkeypatch):
    monkeypatch.setattr(v3, "V3_SHARED_LIMIT", 800)  # SMALL in float64: 384 bytes a step, so 2 steps a tile
    assert v3._v3_fit(v3.V3_LAYOUT, n, np.dtype(np.float64)).steps == 2
    args = scan_inputs(rng, np.float64)
    out, last = run_scan(v3.scan_v3, device, args, delta_softplus=True, chunk_size=5)
    ref, ref_last = reference_scan(args, delta_softplus=True)
    assert_close("scan v3 in tiles of 2 steps", out, ref, F64_TOL)
    assert_close("scan v3 in tiles of 2 steps, last_state", last, ref_last, F64_TOL)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_scan_empty_sequence_hands_the_state_on(v3, device, rng, version):
    func = v3.VERSIONS[version - 1][3]
    args = scan_inputs(rng, np.float32)
    args = {name: (a[..., :0] if name in ("u", "delta", "z", "B", "C") else a) for name, a in args.items()}
    out, last = run_scan(func, device, args, delta_softplus=True)
    assert out.shape == (b, d, 0)
    assert_close(f"{version} l=0 last_state", last, args["initial_state"], 0.0)
    args["initial_state"] = None
    out, last = run_scan(func, device, args, delta_softplus=True)
    assert_close(f"{version} l=0 last_state from no state", last, np.zeros((b, d, n)), 0.0)


# ---------------------------------------------------------------- linear v2

SMALL_LINEAR = dict(row_threads=2, col_threads=4, cols_per_thread=2, k_tile=8)  # 8 threads; 8 rows x 8 features


@pytest.fixture
def lin(kc, monkeypatch):
    """kernels/lab/linear.py with small blocks for both versions (a fast simulator)."""
    from minimamba.kernels.lab import linear

    monkeypatch.setattr(linear, "LINEAR_V2_LAYOUT", linear.LinearLayout(**SMALL_LINEAR))
    monkeypatch.setattr(kc, "THREADS", 8)  # v1 in small blocks too
    return linear


# rows 5: a row tile of 8, partly used; 9: the next row tile; 20: past the most rows one launch takes (8 here).
# blocks 1: one pass over the input width; 264: the width split over 2 blocks, the partial sums added.
@pytest.mark.parametrize("rows,blocks", [(1, 264), (2, 1), (5, 264), (9, 1), (20, 264)])
def test_linear_v2(lin, device, rng, monkeypatch, rows, blocks):
    to_dev, to_host = device
    monkeypatch.setattr(lin, "LINEAR_V2_BLOCKS", blocks)
    base = rng.standard_normal((rows, 2 * 37))
    x = base[:, ::2]  # a strided (rows, 37) view: 37 = 4 tiles of 8 and 5
    weight = rng.standard_normal((11, 37))  # 11 features = a tile of 8 and 3
    bias = rng.standard_normal(11)
    for dtype, tol in ((np.float32, F32_TOL), (np.float64, F64_TOL)):
        got = lin.linear_v2(to_dev(base.astype(dtype))[:, ::2], to_dev(weight.astype(dtype)),
                            to_dev(bias.astype(dtype)))
        assert got.dtype == dtype and got.shape == (rows, 11)
        assert_close(f"linear v2 rows={rows} blocks={blocks} {np.dtype(dtype).name}", to_host(got),
                     x @ weight.T + bias, tol)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("rows,features,width", [(3, 4, 0), (0, 4, 5), (3, 0, 5)])
def test_linear_empty(lin, device, version, rows, features, width):
    to_dev, to_host = device
    got = lin.VERSIONS[version - 1][3](to_dev(np.ones((rows, width))), to_dev(np.ones((features, width))))
    assert_close(f"linear {version} {rows}x{width} @ {width}x{features}", to_host(got), np.zeros((rows, features)), 0.0)


def test_state_update_steps_equal_scan_v3(kc, v3, device, rng):
    """The decode kernel and v3 agree: l single steps from the same state give v3's outputs and final state."""
    to_dev, to_host = device
    args = scan_inputs(rng, np.float64)
    state = to_dev(args["initial_state"].copy())
    outs = [to_host(kc.selective_state_update(
        state, to_dev(args["u"][:, :, t]), to_dev(args["delta"][:, :, t]), to_dev(args["A"]),
        to_dev(args["B"][:, :, t]), to_dev(args["C"][:, :, t]), D=to_dev(args["D"]),
        z=to_dev(args["z"][:, :, t]), dt_bias=to_dev(args["delta_bias"]), dt_softplus=True)) for t in range(l)]
    out, last = run_scan(v3.scan_v3, device, args, delta_softplus=True, chunk_size=4)
    assert_close("state_update x l vs scan v3", np.stack(outs, axis=-1), out, F64_TOL)
    assert_close("state_update x l vs scan v3, state", to_host(state), last, F64_TOL)


# ---------------------------------------------------------------- the lab scripts' own checks


def test_every_lab_version_is_numbered_with_an_idea(scan, lin):
    for module in (scan, lin):
        numbers = [v[0] for v in module.VERSIONS]
        assert numbers == list(range(1, len(numbers) + 1)), f"{module.__name__}: versions numbered {numbers}"
        for number, name, idea, func in module.VERSIONS:
            assert name and len(idea) > 20 and callable(func), f"{module.__name__} version {number}"


@pytest.mark.parametrize("script", ["scan", "linear"])
def test_lab_script_checks_and_times_every_version(kc, script, capsys):
    """The script's main at its tiny size (the check against ops, then the timer) passes, every version named."""
    module = importlib.import_module(f"minimamba.kernels.lab.{script}")
    assert module.main([]) == 0
    text = capsys.readouterr().out
    for number, name, _, _ in module.VERSIONS:
        assert f"{number} {name}" in text
    assert "FAIL" not in text and "all versions agree with the reference" in text


@pytest.mark.parametrize("script", ["scan", "linear"])
def test_lab_script_check_catches_a_wrong_version(kc, script, monkeypatch, capsys):
    """A version off by 1e-3 relative fails its script's check (the check can fail)."""
    module = importlib.import_module(f"minimamba.kernels.lab.{script}")
    good = module.VERSIONS[0]

    def off(*args, **kw):
        result = good[3](*args, **kw)
        if isinstance(result, tuple):
            return (result[0] * 1.001,) + result[1:]
        return result * 1.001

    monkeypatch.setattr(module, "VERSIONS", [good, (2, "wrong", "the first version, scaled by 1.001", off)])
    assert module.main(["--check-only"]) == 1
    text = capsys.readouterr().out
    assert "2 wrong" in text and "FAIL" in text


@pytest.mark.skipif(not SIMULATOR, reason="the script under the simulator; on a GPU gpu_check runs it")
def test_lab_script_runs_as_a_module():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    proc = subprocess.run([sys.executable, "-m", "minimamba.kernels.lab.scan", "--check-only", "--versions", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "1 v1 out" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
