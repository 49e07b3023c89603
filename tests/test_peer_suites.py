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

Tolerances: the peers' own. Every float32 case so far passes them without help; no error
envelope is needed (see `test_float32_tolerances_are_met_without_an_envelope`).
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
    "test_causal_conv1d": 24,
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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fn, kwargs, not_run", peer_cases())
def test_peer_case(fn, kwargs, not_run, impl):
    if not_run:
        pytest.skip(not_run)
    with shim.use(impl_module(impl)):
        run_peer_test(fn, kwargs)
