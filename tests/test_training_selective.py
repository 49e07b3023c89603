"""The training forward (the model's own) against the inference record, and the selectivity ablation in training.

float64 throughout: the finite differences use h = 1e-5, so their own error is
~h^2 (1e-10) plus rounding eps/h (1e-11) relative to the loss; 1e-6 leaves room.
"""

import numpy as np
import pytest

from minimamba import MambaConfig, MambaForCausalLM
from minimamba.model import init_weights
from minimamba.training.grad import TrainingModel

CONFIG = MambaConfig(vocab_size=23, hidden_size=8, state_size=3, num_hidden_layers=2, conv_kernel=3,
                     time_step_rank=2, expand=2, use_conv_bias=True)
SCANS = ["numpy", "numba"]


def weights64():
    rng = np.random.default_rng(0)
    w = {k: v.astype(np.float64) for k, v in init_weights(CONFIG, seed=1).items()}
    for k in w:  # move every parameter off its initial value, so no gradient is zero by symmetry
        w[k] = w[k] + 0.1 * rng.standard_normal(w[k].shape)
    return w


def ids():
    return np.random.default_rng(2).integers(0, CONFIG.vocab_size, (2, 9))


@pytest.mark.parametrize("scan", SCANS)
def test_selective_off_gradients_match_finite_differences(scan):
    if scan == "numba":
        pytest.importorskip("numba")
    w, x = weights64(), ids()
    model = TrainingModel(CONFIG, w, scan=scan, scan_chunk=4, selective=False)
    loss, grads = model.loss_and_grad(x)
    rng, h = np.random.default_rng(3), 1e-5
    for name, g in grads.items():
        v = rng.standard_normal(g.shape)
        w[name] += h * v
        up = model.loss(x)
        w[name] -= 2 * h * v
        down = model.loss(x)
        w[name] += h * v
        numeric, analytic = (up - down) / (2 * h), float((g * v).sum())
        print(f"{name:45s} fd {numeric:+.10e} analytic {analytic:+.10e}")
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric)), name
    assert np.abs(grads["backbone.layers.0.mixer.x_proj.weight"]).max() > 1e-4  # x_proj still learns


def test_selective_off_training_loss_equals_the_model_with_selective_off():
    w, x = weights64(), ids()
    model = MambaForCausalLM(CONFIG, dtype="float64", init=False).load_state_dict(w)
    for layer in model.backbone.layers:
        layer.mixer.selective = False
    want = float(model(x, labels=x).loss)
    got = TrainingModel(CONFIG, w, scan="numpy", selective=False).loss(x)
    on = TrainingModel(CONFIG, w, scan="numpy").loss(x)
    print(f"selective off: model {want:.15f} training {got:.15f}; on {on:.15f}")
    assert abs(got - want) <= 1e-12 * want and abs(on - want) > 1e-6


def test_what_the_backward_reads_equals_the_inference_record():
    """The training forward is the model's own; its plugged-in scan (which keeps the states) and the
    recomputed conv must give what the inference kernels give, name by name."""
    from minimamba import ops

    w, x = weights64(), ids()
    record = MambaForCausalLM(CONFIG, dtype="float64", impl="numpy", init=False).load_state_dict(w)(
        x, record=True).record
    for scan in SCANS:
        if scan == "numba":
            pytest.importorskip("numba")
        model = TrainingModel(CONFIG, w, scan=scan, scan_chunk=4)
        _, cache = model._forward(x, None, None, training=False, keep=True)
        train_record, kernel_saved = cache[2]
        assert len(kernel_saved) == CONFIG.num_hidden_layers
        for i in range(CONFIG.num_hidden_layers):
            s = model._saved_from_record(i, train_record, kernel_saved[i])
            m = f"backbone.layers.{i}.mixer"
            xs, delta, _, B, C, _, _ = s["scan"]
            pairs = {f"backbone.layers.{i}.norm": s["in_proj"][1], f"{m}.conv_act": ops.silu(s["silu"]),
                     f"{m}.conv_act (scan input)": xs,
                     f"{m}.dt_proj": s["softplus"], f"{m}.dt_softplus": delta, f"{m}.B": B, f"{m}.C": C,
                     f"{m}.scan": s["gate"][0], f"{m}.gated": s["out_proj"][1]}
            for name, got in pairs.items():  # float64; numba's conv rounds differently from numpy's: 1e-12
                want = record[name.split(" ")[0]]
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=f"{scan} {name}")
