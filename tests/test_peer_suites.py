"""The peers' own kernel tests, run unchanged against minimamba.ops and minimamba.kernels.cpu.

causal-conv1d's test file (tests/peers/causal_conv1d/tests/test_causal_conv1d.py, as released
in causal_conv1d 1.7.0) is imported as it is; its kernels reach minimamba through the
stand-ins of tests/peers/shim.py (the CUDA extension replaced, their Python wrappers and
torch reference functions unchanged), with device="cuda" mapped to the CPU. Each of its
test functions runs on a deterministic sample of its parametrization (below), chosen so
that every value of every parameter appears at least once; MINIMAMBA_PEER_CASES=all runs
every combination (hours on 2 cores: the grids go to dim 4128 x seqlen 4096).

mamba_ssm's kernel tests (tests/ops/test_selective_scan.py and
tests/ops/triton/test_selective_state_update.py of the mamba repository) are not in its
source distribution, so they are not vendored here. Point MINIMAMBA_MAMBA_SSM_TESTS at a
checkout's tests/ folder (tag v2.3.2.post1) to run them unchanged in the same way; without
it, `test_mamba_ssm_*` below restate their grids and tolerances, calling mamba_ssm 2.3.2.post1's
own Python wrappers (SelectiveScanFn, MambaInnerFn) and reference functions
(selective_scan_ref, mamba_inner_ref, selective_state_update_ref) from the vendored sdist files.

Outcomes: a case passes when all the peer test's assertions hold. It is skipped when the
peer test skips itself (its own pytest.skip / skipif: CUDA-only determinism tests,
layouts it does not apply to), when its kernel has no minimamba twin (the varlen-states
Triton kernel, complex A), or -- reported separately -- after its forward assertions have
all passed, when it goes on to a backward pass (minimamba.ops has forward functions only).

Tolerances: the peers' own. Where one is finer than the case's data allow, the case is
judged by an error envelope instead (see ENVELOPE_FACTOR below), and says so in its output:
today mamba_inner_fn's cases (outputs up to ~1e7 summed with cancellation: the float32
reference itself lies 0.7 to 450 from float64, far beyond atol 2e-3) and a few bfloat16
selective_state_update cases (the reference reads its state back after rounding it to
bfloat16; minimamba gets a float32 state from the shim, NumPy having no bfloat16). The
causal-conv1d file's cases all pass their own tolerances.
"""

from __future__ import annotations

import itertools
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("einops")

sys.path.insert(0, str(Path(__file__).parent / "peers"))
import shim  # noqa: E402

from minimamba import ops  # noqa: E402

pytestmark = pytest.mark.crosscheck

CAUSAL_TESTS = shim.CAUSAL_CONV1D / "tests/test_causal_conv1d.py"

# Cases per peer test function (None: all). Sized so the whole module runs in about two
# minutes on 2 shared cores; the big ones are the (4128 x 4096) conv grids.
BUDGET = {
    "test_causal_conv1d": 40,
    "test_causal_conv1d_update": 40,
    "test_causal_conv1d_update_with_batch_gather": 20,
    "test_causal_conv1d_update_with_padding": 16,
    "test_causal_conv1d_varlen": 20,
    "test_causal_conv1d_varlen_initial_states": 12,
    "test_causal_conv1d_varlen_padding": 16,
    "test_selective_scan": 6,
    "test_mamba_inner_fn": None,
    "test_selective_state_update": 20,
    "test_selective_state_update_with_heads": 30,
    "test_selective_state_update_with_batch_indices": 20,
    "test_selective_state_update_with_heads_with_batch_indices": 20,
}
NOT_RUN = {  # peer tests with nothing of minimamba to check
    "test_causal_conv1d_get_states": "causal_conv1d_varlen_states is a Triton kernel with no minimamba twin",
    "test_causal_conv1d_race_condition": "a CUDA race check: 10,000 forward+backward runs; minimamba has no backward",
    "test_causal_conv1d_ref_varlen_initial_states": "checks causal_conv1d_ref against itself; calls no kernel",
}


def grid(fn):
    """Every parameter combination of a test function's @pytest.mark.parametrize marks, as kwargs."""
    axes = []
    for mark in getattr(fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names, values = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        axes.append([dict(zip(names, v if len(names) > 1 else (v,))) for v in values])
    return [dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*axes)]


def cost(kwargs):
    """A size estimate of a case: the product of its integer parameters (dim, seqlen, width, dstate, ...)."""
    return float(np.prod([v for v in kwargs.values() if isinstance(v, int) and not isinstance(v, bool)] or [1]))


def sample(combos, budget, seed):
    """`budget` combinations of a grid, deterministic in `seed`.

    First every value of every parameter once, each through the cheapest combination
    that brings a value not yet seen (so seqlen 4096 comes with dim 64 and dim 4128 with
    a short seqlen); then random combinations from the cheaper half of the grid.
    """
    if os.environ.get("MINIMAMBA_PEER_CASES") == "all" or budget is None or len(combos) <= budget:
        return list(range(len(combos)))
    order = list(range(len(combos)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: cost(combos[i]))  # stable: ties stay shuffled
    chosen, seen = [], set()
    for i in order:
        new = {(k, repr(v)) for k, v in combos[i].items()} - seen
        if new:
            chosen.append(i)
            seen |= new
    cheaper_half = order[:len(order) // 2]
    random.Random(seed).shuffle(cheaper_half)
    chosen += [i for i in cheaper_half if i not in chosen][:max(0, budget - len(chosen))]
    return sorted(chosen)


def case_id(kwargs):
    return "-".join(f"{k}={str(v).replace('torch.', '')}" for k, v in kwargs.items())


def peer_files():
    files = [CAUSAL_TESTS]
    root = os.environ.get("MINIMAMBA_MAMBA_SSM_TESTS")
    if root:
        files += [Path(root) / "ops/test_selective_scan.py", Path(root) / "ops/triton/test_selective_state_update.py"]
    return files


def peer_cases():
    modules = shim.load_peer_tests(peer_files())
    cases = []
    for path, module in modules.items():
        for name, fn in vars(module).items():
            if not (name.startswith("test_") and callable(fn)):
                continue
            label = f"{Path(path).stem}::{name}"
            if name in NOT_RUN:
                cases.append(pytest.param(fn, {}, NOT_RUN[name], id=label))
                continue
            combos = grid(fn)
            for i in sample(combos, BUDGET.get(name), label):
                cases.append(pytest.param(fn, combos[i], None, id=f"{label}[{case_id(combos[i])}]"))
    return cases


def run_peer_test(fn, kwargs):
    """Run one peer test case on the CPU; a backward pass after passing forward checks is a skip."""
    for mark in getattr(fn, "pytestmark", []):
        if mark.name == "skipif" and mark.args and mark.args[0]:
            pytest.skip(f"the peer test's own skipif: {mark.kwargs.get('reason', '')}")
    if "monkeypatch" in fn.__code__.co_varnames[:fn.__code__.co_argcount]:
        pytest.skip("needs a pytest fixture; only the CUDA-only determinism tests do")
    with shim.CudaAsCpu():
        try:
            fn(**kwargs)
        except shim.BackwardNotProvided:
            pytest.skip("forward assertions passed; the test goes on to a backward pass, "
                        "which minimamba.ops does not provide")
        except shim.NoTwin as err:
            pytest.skip(f"no minimamba twin: {err}")


IMPLS = ["ops", "numba"]


def impl_module(impl):
    if impl == "ops":
        return ops
    pytest.importorskip("numba")
    from minimamba.kernels import cpu
    return cpu


def pytest_generate_tests(metafunc):
    """The peer cases, loaded only when the crosscheck suite is selected (the default suite,
    `-m 'not crosscheck'`, deselects them and need not import the vendored files)."""
    if "not_run" in metafunc.fixturenames:
        deselected = "not crosscheck" in " ".join((metafunc.config.getoption("markexpr") or "").split())
        metafunc.parametrize("fn, kwargs, not_run", [] if deselected else peer_cases())


@pytest.mark.parametrize("impl", IMPLS)
def test_peer_case(fn, kwargs, not_run, impl):
    if not_run:
        pytest.skip(not_run)
    with shim.use(impl_module(impl)):
        run_peer_test(fn, kwargs)


# ---------------------------------------------------------------- mamba_ssm 2.3.2.post1, restated
# Its kernel tests are not in its sdist (see the module docstring). These restate them: the
# same data recipes, seeds, grids and tolerances as tests/ops/test_selective_scan.py and
# tests/ops/triton/test_selective_state_update.py at v2.3.2.post1, forward assertions only,
# calling mamba_ssm's own Python wrappers and reference functions (vendored, unchanged).
# Where their grid is narrowed by commented-out values (`# @pytest.mark.parametrize(...)`),
# the commented values are included here too.


def _mamba():
    return shim.load_mamba_ssm()


# The error envelope: where a peer tolerance is finer than the case's own data allow (huge
# values summed with cancellation, bfloat16 states the reference rounds at another point),
# minimamba's result is judged by how far it lies from a float64 run on the same data,
# against how far the peer's own reference run at the test's precision lies from it:
# at most ENVELOPE_FACTOR times as far. 4 leaves room for a different but equally
# valid order of roundings (one ulp more per step), not for a wrong formula, whose error
# is orders of magnitude larger. Cases judged this way say so in their output.
ENVELOPE_FACTOR = 4


def _judge(name, got, want, truth=None, rtol=0.0, atol=0.0):
    """The peer's tolerance (got against its reference `want`); where that fails, the envelope against float64 `truth`."""
    err = (got.double() - want.double()).abs().max().item()
    if torch.allclose(got, want, rtol=rtol, atol=atol):
        print(f"{name}: max abs err {err:.3e}, within the peer tolerance (rtol {rtol}, atol {atol})")
        return "tolerance"
    assert truth is not None, f"{name}: max abs err {err:.3e}, outside the peer tolerance (rtol {rtol}, atol {atol})"
    ours = (got.double() - truth).abs().max().item()
    theirs = (want.double() - truth).abs().max().item()
    assert ours <= ENVELOPE_FACTOR * theirs, (
        f"{name}: outside the peer tolerance (max abs err {err:.3e}; rtol {rtol}, atol {atol}) and outside the "
        f"envelope: {ours:.3e} from float64, the peer reference's own run {theirs:.3e} (x{ENVELOPE_FACTOR} allowed)")
    print(f"{name}: judged by the error envelope: {ours:.3e} from float64 (the peer reference {theirs:.3e})")
    return "envelope"


def _float64_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """selective_scan_fn in float64 for torch tensors: minimamba's selective_scan_ref, the plain recurrence
    (itself checked against independent scalar loops in tests/test_ops.py). mamba_ssm's selective_scan_ref
    cannot serve: it casts its inputs to float32."""
    f64 = [None if t is None else shim.to_numpy(t).astype(np.float64) for t in (u, delta, A, B, C, D, z, delta_bias)]
    out = ops.selective_scan_ref(*f64[:5], D=f64[5], z=f64[6], delta_bias=f64[7], delta_softplus=delta_softplus,
                                 return_last_state=return_last_state)
    return tuple(map(torch.from_numpy, out)) if return_last_state else torch.from_numpy(out)


SCAN_GRID = [dict(zip(("varBC_groups", "seqlen", "itype", "variant"), c)) for c in itertools.product(
    (1, 2), (128, 372, 1024, 4096), (torch.float32, torch.float16, torch.bfloat16),
    ("all", "no_z", "no_D_no_bias", "no_softplus", "fixed_B", "fixed_C", "no_last_state"))
    if not (c[0] > 1 and c[3] in ("fixed_B", "fixed_C"))]  # the peer test skips grouped B/C unless both vary


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("p", [SCAN_GRID[i] for i in sample(SCAN_GRID, 24, "selective_scan")],
                         ids=lambda p: case_id(p))
def test_mamba_ssm_selective_scan(p, impl):
    """mamba_ssm's test_selective_scan (forward part): selective_scan_fn against selective_scan_ref."""
    iface, _ = _mamba()
    v, groups, seqlen, itype = p["variant"], p["varBC_groups"], p["seqlen"], p["itype"]
    var_B, var_C = v != "fixed_B", v != "fixed_C"
    rtol, atol = (6e-4, 2e-3) if itype == torch.float32 else (3e-3, 5e-3)
    if itype == torch.bfloat16:
        rtol, atol = 3e-2, 5e-2
    torch.random.manual_seed(0)
    batch, dim, dstate = 2, 4, 8
    A = -0.5 * torch.rand(dim, dstate)
    shape = (batch, dstate, seqlen) if groups == 1 else (batch, groups, dstate, seqlen)
    B = torch.randn(*shape, dtype=itype) if var_B else torch.randn(dim, dstate)
    C = torch.randn(*shape, dtype=itype) if var_C else torch.randn(dim, dstate)
    D = torch.randn(dim) if v != "no_D_no_bias" else None
    z = torch.randn(batch, dim, seqlen, dtype=itype) if v != "no_z" else None
    delta_bias = 0.5 * torch.rand(dim) if v != "no_D_no_bias" else None
    u = torch.randn(batch, dim, seqlen, dtype=itype)
    delta = 0.5 * torch.rand(batch, dim, seqlen, dtype=itype)
    kwargs = dict(z=z, delta_bias=delta_bias, delta_softplus=v != "no_softplus", return_last_state=v != "no_last_state")
    with shim.use(impl_module(impl)):
        got = iface.selective_scan_fn(u, delta, A, B, C, D, **kwargs)
    want = iface.selective_scan_ref(u, delta, A, B, C, D, **kwargs)
    truth = _float64_scan(u, delta, A, B, C, D, **kwargs)
    if kwargs["return_last_state"]:
        _judge("last_state", got[1], want[1], truth[1], rtol, atol)
        got, want, truth = got[0], want[0], truth[0]
    _judge("out", got, want, truth, rtol, atol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("is_variable_B", [False, True])
@pytest.mark.parametrize("is_variable_C", [False, True])
def test_mamba_ssm_mamba_inner_fn(is_variable_B, is_variable_C, impl, monkeypatch):
    """mamba_ssm's test_mamba_inner_fn (forward part, real A): the fused block on minimamba's conv and scan."""
    iface, _ = _mamba()
    rtol, atol = 6e-4, 2e-3
    torch.random.manual_seed(0)
    batch, dim, dstate, dt_rank, seqlen = 2, 768, 8, 48, 128
    xz = torch.randn(batch, 2 * dim, seqlen)
    conv1d_weight = torch.randn(dim, 1, 3)
    conv1d_bias = torch.randn(dim)
    x_proj_weight = torch.randn(dt_rank + (is_variable_B + is_variable_C) * dstate, dim)
    delta_proj_weight = torch.randn(dim, dt_rank)
    out_proj_weight = torch.randn(dim // 2, dim)
    A = -0.5 * torch.rand(dim, dstate)
    B = torch.randn(dim, dstate) if not is_variable_B else None
    C = torch.randn(dim, dstate) if not is_variable_C else None
    D = torch.randn(dim)
    delta_bias = 0.5 * torch.rand(dim)
    args = (xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, None, A, B, C, D)
    with shim.use(impl_module(impl)), shim.CudaAsCpu():
        got = iface.mamba_inner_fn(*args, delta_bias=delta_bias, delta_softplus=True)
    # mamba_inner_ref calls the kernels causal_conv1d_fn and selective_scan_fn (here: minimamba);
    # for a reference independent of minimamba it runs on the torch reference functions instead,
    # and for the float64 truth on causal_conv1d_ref and minimamba's float64 plain recurrence.
    causal_conv1d_ref = shim.load_causal_conv1d().causal_conv1d_ref
    with monkeypatch.context() as patch:
        patch.setattr(iface, "causal_conv1d_fn", causal_conv1d_ref)
        patch.setattr(iface, "selective_scan_fn", iface.selective_scan_ref)
        want = iface.mamba_inner_ref(*args, delta_bias=delta_bias, delta_softplus=True)
        patch.setattr(iface, "selective_scan_fn", _float64_scan)
        args64 = [None if t is None else t.double() for t in args]
        truth = iface.mamba_inner_ref(*args64, delta_bias=delta_bias.double(), delta_softplus=True)
    _judge("out", got, want, truth, rtol, atol)


STATE_GRID = [dict(zip(("heads", "batch_indices", "ngroups", "tie_hdim", "dstate", "dim", "has_z", "itype"), c))
              for c in itertools.product((False, True), (False, True), (1, 2, 4), (False, True), (16, 32, 64),
                                         (2048, 2048 + 16, 4096), (False, True),
                                         (torch.float32, torch.float16, torch.bfloat16))
              if (c[0] or (c[2] == 1 and not c[3])) and not (c[0] and c[5] == 2048 + 16)]


def _state_update_tolerance(heads, batch_indices, itype):
    """The four peer tests' tolerance tables."""
    if itype == torch.float32:
        return 3e-4, 1e-3
    if itype == torch.float16:
        return (5e-3, 3e-2) if heads else (5e-3, 1e-2)
    return {(False, False): (1e-2, 5e-2), (True, False): (1e-2, 1e-1),
            (False, True): (6e-2, 6e-2), (True, True): (1e-1, 1e-1)}[heads, batch_indices]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("p", [STATE_GRID[i] for i in sample(STATE_GRID, 40, "state_update")],
                         ids=lambda p: case_id(p))
def test_mamba_ssm_selective_state_update(p, impl):
    """mamba_ssm's four selective_state_update tests (plain, with_heads, with_batch_indices, both)."""
    from einops import repeat

    _, ssu = _mamba()
    heads, with_idx, itype, dim, dstate = p["heads"], p["batch_indices"], p["itype"], p["dim"], p["dstate"]
    rtol, atol = _state_update_tolerance(heads, with_idx, itype)
    torch.random.manual_seed(0)
    batch = 16 if with_idx else 2
    rows = 10 * batch if with_idx else batch
    headdim = 64
    nheads = dim // headdim
    lead = (nheads, headdim) if heads else (dim,)
    state = torch.randn(rows, *lead, dstate, dtype=itype)
    idx = torch.randperm(rows)[:batch].to(torch.int32) if with_idx else None
    x = torch.randn(batch, *lead, dtype=itype)
    if heads and p["tie_hdim"]:
        dt = repeat(torch.randn(batch, nheads, dtype=itype), "b h -> b h p", p=headdim)
        dt_bias = repeat(torch.rand(nheads) - 4.0, "h -> h p", p=headdim)
        A = repeat(-torch.rand(nheads) - 1.0, "h -> h p n", p=headdim, n=dstate)
        D = repeat(torch.randn(nheads), "h -> h p", p=headdim)
    else:
        dt = torch.randn(batch, *lead, dtype=itype)
        dt_bias = torch.rand(*lead) - 4.0
        A = -torch.rand(*lead, dstate) - 1.0
        D = torch.randn(*lead)
    B = torch.randn(batch, p["ngroups"], dstate) if heads else torch.randn(batch, dstate)
    C = torch.randn(batch, p["ngroups"], dstate) if heads else torch.randn(batch, dstate)
    z = torch.randn_like(x) if p["has_z"] else None
    state_ref = (state[idx] if with_idx else state).detach().clone()
    with shim.use(impl_module(impl)):
        out = ssu.selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                         state_batch_indices=idx)
    state64 = state_ref.double()
    out_ref = ssu.selective_state_update_ref(state_ref, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    f64 = [None if t is None else t.double() for t in (x, dt, A, B, C, D, z, dt_bias)]
    truth = ssu.selective_state_update_ref(state64, *f64[:5], D=f64[5], z=f64[6], dt_bias=f64[7], dt_softplus=True)
    _judge("state", state[idx] if with_idx else state, state_ref, state64, rtol, atol)
    _judge("out", out, out_ref, truth, rtol, atol)


def test_the_envelope_rejects_a_slightly_wrong_scan(monkeypatch):
    """The envelope is no blanket pass: a scan off by one part in 10^4 fails mamba_inner_fn's case,
    whose peer tolerance alone is too fine for its data (the float32 reference is ~1e-5 off float64)."""
    wrong = type(ops)("wrong_ops")
    wrong.__dict__.update(vars(ops))

    def selective_scan_fn(*args, **kwargs):
        out, last = ops.selective_scan_fn(*args, **kwargs)
        return out * np.float32(1 + 1e-4), last
    wrong.selective_scan_fn = selective_scan_fn
    monkeypatch.setattr(sys.modules[__name__], "impl_module", lambda impl: wrong)
    with pytest.raises(AssertionError, match="outside the envelope"):
        test_mamba_ssm_mamba_inner_fn(True, True, "ops", monkeypatch)
