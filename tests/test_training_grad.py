"""The whole model's parameter gradients against PyTorch autograd of transformers' MambaForCausalLM.

The golden file tests/fixtures/grad/tiny_grads.npz was written by
tests/fixtures/make_grad_fixtures.py (torch autograd, float64); the crosscheck
test reruns torch live. Both runs are float64, so the only differences are
summation order: relative errors ~1e-13 are expected; we allow 1e-9.
"""

import json
import os

import numpy as np
import pytest

from minimamba import MambaConfig
from minimamba.training.grad import TrainingModel

GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures", "grad", "tiny_grads.npz")
RTOL = 1e-9  # float64 on both sides; see the module docstring


def load_golden():
    z = np.load(GOLDEN)
    config = MambaConfig.from_dict(json.loads(str(z["config"])))
    weights = {k[len("weight/"):]: z[k] for k in z.files if k.startswith("weight/")}
    grads = {k[len("grad/"):]: z[k] for k in z.files if k.startswith("grad/")}
    return config, weights, z["input_ids"], z["labels"], float(z["loss"]), grads


def compare(name_loss, loss, ref_loss, grads, ref_grads):
    print(f"loss {loss:.15f} vs {ref_loss:.15f}: abs err {abs(loss - ref_loss):.2e}")
    assert abs(loss - ref_loss) <= RTOL * abs(ref_loss)
    assert set(grads) == set(ref_grads)
    worst = 0.0
    for name in sorted(ref_grads):
        err = np.abs(grads[name] - ref_grads[name]).max() / np.abs(ref_grads[name]).max()
        worst = max(worst, err)
        print(f"{name:45s} max rel err {err:.2e}")
    assert worst <= RTOL, f"worst relative gradient error {worst:.2e} ({name_loss})"


@pytest.mark.parametrize("scan", ["numpy", "numba"])
def test_gradients_match_torch_golden(scan):
    if scan == "numba":
        pytest.importorskip("numba")
    config, weights, ids, labels, ref_loss, ref_grads = load_golden()
    model = TrainingModel(config, {k: v.copy() for k, v in weights.items()}, scan=scan, scan_chunk=4)
    loss, grads = model.loss_and_grad(ids, labels)
    compare(scan, loss, ref_loss, grads, ref_grads)


def test_float32_gradients_close_to_float64():
    """float32 training gradients vs the float64 golden: float32 rounding only (eps 6e-8, a few hundred ops deep)."""
    config, weights, ids, labels, ref_loss, ref_grads = load_golden()
    model = TrainingModel(config, {k: v.astype(np.float32) for k, v in weights.items()}, scan="numpy")
    loss, grads = model.loss_and_grad(ids, labels)
    for name in sorted(ref_grads):
        err = np.abs(grads[name] - ref_grads[name]).max() / np.abs(ref_grads[name]).max()
        print(f"{name:45s} float32 max rel err {err:.2e}")
        assert err < 1e-4, name


def test_loss_matches_inference_model():
    """The training forward's loss equals MambaForCausalLM's (the inference code path) on the same weights."""
    from minimamba import MambaForCausalLM

    config, weights, ids, labels, ref_loss, _ = load_golden()
    model = MambaForCausalLM(config, dtype="float64", init=False).load_state_dict(weights)
    loss = float(model(ids, labels=labels).loss)
    print(f"inference loss {loss:.15f} golden {ref_loss:.15f}")
    assert abs(loss - ref_loss) <= RTOL * ref_loss


def test_bad_input_ids_are_named():
    config, weights, *_ = load_golden()
    model = TrainingModel(config, weights, scan="numpy")
    with pytest.raises(ValueError, match="token ids must lie in"):
        model.loss_and_grad(np.array([[0, config.vocab_size]]))
    with pytest.raises(ValueError, match="length >= 2"):
        model.loss_and_grad(np.array([[1]]))


@pytest.mark.crosscheck
def test_gradients_match_torch_live():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
    from make_grad_fixtures import make_case, torch_loss_and_grads

    for seed in (0, 1, 2):
        config, weights, ids, labels = make_case(seed)
        ref_loss, ref_grads = torch_loss_and_grads(config, weights, ids, labels)
        loss, grads = TrainingModel(config, {k: v.copy() for k, v in weights.items()}).loss_and_grad(ids, labels)
        compare(f"seed {seed}", loss, ref_loss, grads, ref_grads)
