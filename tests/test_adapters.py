"""LoRA adapters on an inference model: unmerged (PEFT's numbers), merged, from_pretrained(ADAPTER), --adapter.

Float64 for the exactness checks: both sides then differ by summation order only (~1e-12).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from minimamba import MambaConfig, MambaForCausalLM
from minimamba.adapters import LoraEmbeddingWeight, LoraLinearWeight
from minimamba.model import init_weights
from minimamba.training import lora
from minimamba.training.grad import TrainingModel
from minimamba.weights import save_pretrained

TINY = dict(vocab_size=61, hidden_size=24, state_size=3, num_hidden_layers=2, conv_kernel=3, time_step_rank=5,
            expand=2)
PEFT_TARGETS = ("x_proj", "embeddings", "in_proj")  # what PEFT applies in transformers' Mamba forward


@pytest.fixture
def saved(tmp_path):
    """A float64 base folder and an adapter folder (both factors random, so the adapter changes the logits)."""
    config = MambaConfig(**TINY)
    params = {k: v.astype(np.float64) for k, v in init_weights(config, 0).items()}
    adapters = lora.add_adapters(config, params, PEFT_TARGETS + ("out_proj",), r=3, alpha=6, seed=0)
    rng = np.random.default_rng(7)
    for a in adapters.values():
        a.A = a.A + 0.1 * rng.standard_normal(a.A.shape)
        a.B = a.B + 0.1 * rng.standard_normal(a.B.shape)
    save_pretrained(tmp_path / "base", config, params)
    lora.save_adapter(tmp_path / "adapter", adapters, base_model_name_or_path=str(tmp_path / "base"))
    ids = rng.integers(0, config.vocab_size, (2, 7))
    return config, params, tmp_path, ids


def test_unmerged_adapter_equals_the_training_forward(saved):
    """The weight objects reproduce TrainingModel's adapted forward (PEFT's semantics: tied head = base embedding)."""
    config, params, folder, ids = saved
    model = MambaForCausalLM.from_pretrained(folder / "base", dtype="float64").load_adapter(folder / "adapter")
    assert isinstance(model.backbone.embeddings_weight, LoraEmbeddingWeight)
    assert isinstance(model.backbone.layers[1].mixer.out_proj_weight, LoraLinearWeight)
    loaded = lora.load_adapter(folder / "adapter", config, params, dtype=np.float64)
    want = TrainingModel(config, params, adapters=loaded, scan="numpy").logits(ids)
    got = model(ids).logits
    base = MambaForCausalLM.from_pretrained(folder / "base", dtype="float64")(ids).logits
    err = np.abs(got - want).max()
    print(f"unmerged vs training forward: max abs err {err:.2e}; the adapter moves the logits by "
          f"{np.abs(want - base).max():.2e}")
    assert err < 1e-12  # float64, same operations in another order
    assert np.abs(want - base).max() > 1e-3  # the adapter does something


def test_merge_on_request_and_from_pretrained_follows_the_base(saved):
    config, params, folder, ids = saved
    merged = MambaForCausalLM.from_pretrained(folder / "base", dtype="float64").load_adapter(folder / "adapter",
                                                                                            merge=True)
    assert isinstance(merged.backbone.embeddings_weight, np.ndarray)
    loaded = lora.load_adapter(folder / "adapter", config, params, dtype=np.float64)
    want_params = lora.merge_adapters(params, loaded)
    want = MambaForCausalLM(config, dtype="float64", init=False).load_state_dict(want_params)(ids).logits
    assert np.abs(merged(ids).logits - want).max() < 1e-12

    followed = MambaForCausalLM.from_pretrained(folder / "adapter", dtype="float64")  # AutoPeftModel's way
    unmerged = MambaForCausalLM.from_pretrained(folder / "base", dtype="float64").load_adapter(folder / "adapter")
    np.testing.assert_array_equal(followed(ids).logits, unmerged(ids).logits)
    with pytest.raises(ValueError, match="already carries an unmerged adapter"):
        unmerged.load_adapter(folder / "adapter")
    with pytest.raises(TypeError, match="unmerged LoRA adapter"):
        np.asarray(unmerged.backbone.embeddings_weight)  # never silently the base alone


def test_adapter_without_base_name_says_what_to_do(saved, tmp_path):
    _, _, folder, _ = saved
    cfg_path = folder / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = None
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="names no base_model_name_or_path"):
        MambaForCausalLM.from_pretrained(folder / "adapter")


def test_generate_cli_with_adapter(tmp_path):
    """`minimamba generate --adapter DIR` on the built-in model; the adapter alone names its base."""
    import minimamba

    config = MambaConfig.from_pretrained(minimamba.BUILTIN_MODEL_DIR)
    params = MambaForCausalLM.from_pretrained("builtin").state_dict()
    adapters = lora.add_adapters(config, params, PEFT_TARGETS, r=2, alpha=4, seed=0)
    rng = np.random.default_rng(1)
    for a in adapters.values():  # large enough to change the greedy text
        a.A = a.A + 0.3 * rng.standard_normal(a.A.shape).astype(np.float32)
        a.B = a.B + 0.3 * rng.standard_normal(a.B.shape).astype(np.float32)
    lora.save_adapter(tmp_path / "ad", adapters, base_model_name_or_path=minimamba.BUILTIN_MODEL_DIR)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    runs = {}
    for name, extra in {"base": [], "adapter": ["--adapter", str(tmp_path / "ad")],
                        "alone": ["--model", str(tmp_path / "ad")],
                        "merged": ["--adapter", str(tmp_path / "ad"), "--merge-adapter"]}.items():
        result = subprocess.run([sys.executable, "-m", "minimamba.cli", "generate", "ROMEO:", "--temperature", "0",
                                 "--max-new-tokens", "12", *extra], capture_output=True, text=True, env=env,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        runs[name] = result.stdout
    print(runs)
    assert runs["adapter"] == runs["alone"]
    assert runs["adapter"] != runs["base"]  # the adapter changes the greedy text
    assert runs["merged"].startswith("ROMEO:")  # merged: the tied head changes too, so the text may differ


@pytest.mark.crosscheck
def test_unmerged_adapter_equals_peft_unmerged_forward(saved, tmp_path):
    """Against PEFT itself: tied head with an adapted embedding, PEFT's unmerged forward, float64."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from test_training_lora import keep_float64, peft_model

    config, params, folder, ids = saved
    adapters = lora.load_adapter(folder / "adapter", config, params, dtype=np.float64)
    del adapters["backbone.layers.0.mixer.out_proj"], adapters["backbone.layers.1.mixer.out_proj"]
    lora.save_adapter(tmp_path / "peft_ok", adapters, base_model_name_or_path=str(folder / "base"))  # PEFT refuses out_proj
    with keep_float64():
        pm = peft_model(folder / "base", tmp_path / "peft_ok").double()
        with torch.no_grad():
            ref = pm(input_ids=torch.from_numpy(ids)).logits.numpy()
    ours = MambaForCausalLM.from_pretrained(tmp_path / "peft_ok", dtype="float64")(ids).logits
    err = np.abs(ours - ref).max()
    print(f"PEFT unmerged vs minimamba unmerged: max abs err {err:.2e} (max |logit| {np.abs(ref).max():.2f})")
    assert config.tie_word_embeddings
    assert err < 1e-10  # float64 on both sides: summation order only


def test_adapter_on_a_quantized_base(tmp_path):
    """from_pretrained(ADAPTER, quantization=) quantizes the base and keeps the adapter unmerged on top: the
    same logits as the adapter on the base's dequantized weights (float32; only summation order differs)."""
    from minimamba.quant import QuantizedWeight, dequantized, quantize

    config = MambaConfig(**dict(TINY, hidden_size=32))  # rows of 32 and 64 weights: whole int8 blocks
    params = init_weights(config, 0)
    adapters = lora.add_adapters(config, params, ("embeddings", "in_proj", "out_proj"), r=2, alpha=4, seed=0)
    for a in adapters.values():
        a.B = a.B + 0.1 * np.random.default_rng(3).standard_normal(a.B.shape).astype(np.float32)
    save_pretrained(tmp_path / "base", config, params)
    lora.save_adapter(tmp_path / "adapter", adapters, base_model_name_or_path=str(tmp_path / "base"))
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 6))

    model = MambaForCausalLM.from_pretrained(tmp_path / "adapter", quantization="int8")
    adapted = model.backbone.layers[0].mixer.in_proj_weight
    assert isinstance(adapted, LoraLinearWeight) and isinstance(adapted.base, QuantizedWeight)
    base_q = quantize(MambaForCausalLM.from_pretrained(tmp_path / "base"), "int8")
    want = dequantized(base_q).load_adapter(tmp_path / "adapter")(ids).logits
    got = model(ids).logits
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"adapter on int8 base vs on its dequantized weights: max rel err {err:.1e}")
    assert err < 1e-5  # float32 rounding of a few sums of <= 64 terms
