"""LoRA: the adapter's backward (finite differences), PEFT's file format, merging, and PEFT itself.

Float64 throughout the exactness checks; tolerances as in test_training_backward.py.
"""

import json

import numpy as np
import pytest

from minimamba import MambaConfig
from minimamba.model import init_weights
from minimamba.training import lora
from minimamba.training.grad import TrainingModel

TINY = dict(vocab_size=61, hidden_size=24, state_size=3, num_hidden_layers=2, conv_kernel=3, time_step_rank=5,
            expand=2)
ALL = ("x_proj", "embeddings", "in_proj", "dt_proj", "out_proj")


def make(targets=ALL, dropout=0.0, seed=0):
    config = MambaConfig(**TINY)
    params = {k: v.astype(np.float64) for k, v in init_weights(config, seed).items()}
    adapters = lora.add_adapters(config, params, targets, r=3, alpha=6, dropout=dropout, seed=seed)
    rng = np.random.default_rng(seed + 7)
    for a in adapters.values():  # both factors nonzero, so every gradient path is exercised
        a.A = a.A + 0.1 * rng.standard_normal(a.A.shape)
        a.B = a.B + 0.1 * rng.standard_normal(a.B.shape)
    ids = rng.integers(0, config.vocab_size, (2, 7))
    return config, params, adapters, ids


def test_lora_gradients_finite_differences():
    config, params, adapters, ids = make()
    model = TrainingModel(config, params, adapters=adapters, scan="numpy")
    loss, grads = model.loss_and_grad(ids)
    assert set(grads) == set(model.trainable())  # base frozen: only adapter gradients
    assert not any(k in params for k in grads)
    rng = np.random.default_rng(3)
    eps = 1e-6
    for name, arr in model.trainable().items():
        v = rng.standard_normal(arr.shape)
        arr += eps * v
        lp = model.loss(ids)
        arr -= 2 * eps * v
        lm = model.loss(ids)
        arr += eps * v
        fd, an = (lp - lm) / (2 * eps), float((grads[name] * v).sum())
        rel = abs(fd - an) / max(abs(fd), abs(an), 1e-8)
        print(f"{name:55s} fd {fd:+.8e} analytic {an:+.8e} rel err {rel:.1e}")
        # central differences in float64: ~1e-9 relative, and an absolute floor of
        # |loss| * 1e-16 / eps ~ 1e-9 from rounding the two losses
        assert abs(fd - an) < 1e-6 * max(abs(fd), abs(an)) + 1e-8


def test_dropout_backward_uses_the_same_mask():
    """With dropout the loss is random; the gradient must be that of the loss drawn with the same generator."""
    config, params, adapters, ids = make(targets=("in_proj",), dropout=0.5)
    model = TrainingModel(config, params, adapters=adapters, scan="numpy")
    loss, grads = model.loss_and_grad(ids, rng=np.random.default_rng(5))
    name = "backbone.layers.0.mixer.in_proj.lora_A.weight"
    arr = model.trainable()[name]
    v = np.random.default_rng(1).standard_normal(arr.shape)
    eps = 1e-6
    arr += eps * v
    lp = model.loss_and_grad(ids, rng=np.random.default_rng(5))[0]
    arr -= 2 * eps * v
    lm = model.loss_and_grad(ids, rng=np.random.default_rng(5))[0]
    arr += eps * v
    fd, an = (lp - lm) / (2 * eps), float((grads[name] * v).sum())
    print(f"dropout: fd {fd:.8e} analytic {an:.8e}")
    assert abs(fd - an) <= 1e-6 * max(abs(fd), abs(an))
    assert model.loss(ids) != loss  # evaluation has no dropout


def test_save_load_round_trip_with_peft_names(tmp_path):
    config, params, adapters, ids = make()
    lora.save_adapter(tmp_path, adapters, base_model_name_or_path="base")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 3 and cfg["lora_alpha"] == 6
    from minimamba.weights import read_safetensors

    keys = set(read_safetensors(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.backbone.layers.1.mixer.x_proj.lora_B.weight" in keys
    assert "base_model.model.backbone.embeddings.lora_embedding_A" in keys
    loaded = lora.load_adapter(tmp_path, config, params, dtype=np.float64)
    assert set(loaded) == set(adapters)
    for name, a in adapters.items():
        np.testing.assert_array_equal(loaded[name].A, a.A.astype(np.float32))  # stored as float32
        np.testing.assert_array_equal(loaded[name].B, a.B.astype(np.float32))
        assert loaded[name].kind == a.kind and loaded[name].scale == a.scale


def test_merge_equals_the_adapter_forward():
    """Without an embedding adapter (see the NOTE in lora.merge_adapters), merged weights give the same logits."""
    config, params, adapters, ids = make(targets=("x_proj", "in_proj", "dt_proj", "out_proj"))
    with_adapters = TrainingModel(config, params, adapters=adapters, scan="numpy").logits(ids)
    merged = TrainingModel(config, lora.merge_adapters(params, adapters), scan="numpy").logits(ids)
    base = TrainingModel(config, params, scan="numpy").logits(ids)
    err = np.abs(with_adapters - merged).max()
    print(f"merged vs adapter logits max abs err {err:.2e}; the adapter moves them by {np.abs(base - merged).max():.2e}")
    assert err < 1e-12  # float64, same sums grouped differently
    assert np.abs(base - merged).max() > 1e-3


def test_embedding_adapter_merge_matches_for_the_input_side():
    config, params, adapters, ids = make(targets=("embeddings",))
    merged = lora.merge_adapters(params, adapters)
    emb = adapters["backbone.embeddings"]
    lookup = params["backbone.embeddings.weight"][ids] + lora.lora_embedding_forward(ids, emb)[0]
    np.testing.assert_allclose(merged["backbone.embeddings.weight"][ids], lookup, rtol=1e-13, atol=1e-13)


def test_bad_adapter_input_is_named(tmp_path):
    config, params, adapters, ids = make(targets=("in_proj",))
    with pytest.raises(ValueError, match="not supported"):
        lora.add_adapters(config, params, ("conv1d",))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_adapter(tmp_path, config, params)
    lora.save_adapter(tmp_path, adapters)
    small = MambaConfig(**dict(TINY, hidden_size=16))
    with pytest.raises(ValueError, match="do not fit"):
        lora.load_adapter(tmp_path, small, {k: v for k, v in init_weights(small).items()})


# ---------------------------------------------------------------- against PEFT itself


def keep_float64():
    """transformers' Mamba upcasts to float32 internally; this patch keeps a float64 model float64."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
    from make_grad_fixtures import keep_float64 as patch

    return patch()


def peft_model(folder_base, adapter_dir):
    import torch
    from peft import PeftModel
    from transformers import MambaForCausalLM

    base = MambaForCausalLM.from_pretrained(folder_base, dtype=torch.float64).eval()
    return PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.mark.crosscheck
def test_peft_loads_our_adapter_and_gives_the_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from minimamba.weights import save_pretrained

    # NOTE: no dt_proj here: transformers' Mamba reads dt_proj.weight directly
    # (modeling_mamba.py: `self.dt_proj.weight @ time_step`), so PEFT's dt_proj adapter
    # never reaches its forward; only a merged dt_proj adapter counts there.
    config, params, adapters, ids = make(targets=("x_proj", "embeddings", "in_proj"))
    save_pretrained(tmp_path / "base", config, params)  # float64 weights
    lora.save_adapter(tmp_path / "adapter", adapters, base_model_name_or_path=str(tmp_path / "base"))
    with keep_float64():
        pm = peft_model(tmp_path / "base", tmp_path / "adapter").double()
        with torch.no_grad():
            ref = pm(input_ids=torch.from_numpy(ids)).logits.numpy()
    # the adapter file stores float32 factors; load them as PEFT did, then compute in float64
    loaded = lora.load_adapter(tmp_path / "adapter", config, params, dtype=np.float64)
    ours = TrainingModel(config, params, adapters=loaded).logits(ids)
    err = np.abs(ours - ref).max()
    print(f"PEFT vs minimamba logits with our adapter: max abs err {err:.2e} (max |logit| {np.abs(ref).max():.2f})")
    assert err < 1e-10  # float64 on both sides: summation order only


@pytest.mark.crosscheck
def test_we_load_an_adapter_saved_by_peft(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from minimamba.weights import save_pretrained

    config, params, _, ids = make()
    save_pretrained(tmp_path / "base", config, params)
    with keep_float64():
        base = transformers.MambaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float64)
        lc = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["x_proj", "embeddings", "in_proj"],
                             init_lora_weights=False)  # random B as well as A: the adapter changes the logits
        pm = peft.get_peft_model(base, lc).double().eval()
        pm.save_pretrained(tmp_path / "peft_adapter")  # PEFT stores the factors as float64 here
        with torch.no_grad():
            ref = pm(input_ids=torch.from_numpy(ids)).logits.numpy()
        merged_ref = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    adapters = lora.load_adapter(tmp_path / "peft_adapter", config, params, dtype=np.float64)
    ours = TrainingModel(config, params, adapters=adapters).logits(ids)
    err = np.abs(ours - ref).max()
    print(f"PEFT's own adapter: max abs err {err:.2e} (max |logit| {np.abs(ref).max():.2f})")
    assert err < 1e-10  # float64 on both sides
    merged = lora.merge_adapters(params, adapters)
    worst = max(float(np.abs(merged[k] - merged_ref[k]).max()) for k in merged)
    print(f"merged weights vs PEFT merge_and_unload: max abs err {worst:.2e}")
    assert worst < 1e-12
