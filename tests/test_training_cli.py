"""`minimamba train` and `minimamba finetune` end to end on 12 KB of Shakespeare, in subprocesses.

Tiny shapes and a handful of steps: these check the plumbing (files, formats,
resume, errors), not the quality of the model.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from minimamba import MambaForCausalLM

HERE = os.path.dirname(__file__)
TEXT = os.path.join(HERE, "data", "shakespeare_tiny.txt")
TINY_ARGS = ["--vocab-size", "300", "--hidden-size", "16", "--layers", "2", "--state-size", "4",
             "--seq-len", "24", "--batch-size", "2", "--eval-batches", "1", "--log-every", "1", "--warmup", "2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def minimamba(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "minimamba.cli", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"minimamba {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def train(out, steps, *extra):
    return minimamba("train", "--text", TEXT, "--out", out, "--steps", steps, "--eval-every", 2,
                     "--save-every", 2, *TINY_ARGS, *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    proc = train(out, 4)
    return out, proc


def test_train_writes_an_hf_checkpoint(trained):
    out, proc = trained
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "optimizer.safetensors", "trainer_state.json"):
        assert (out / name).is_file(), name
    assert "tok/s" in proc.stderr and "val loss" in proc.stderr  # the progress bar and the validation line
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["step"] == 4 and np.isfinite(summary["val_loss"])
    model = MambaForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 300 and model.config.num_hidden_layers == 2
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["history"] if "loss" in h]
    print("training losses", losses)
    assert len(losses) == 4


def test_trained_checkpoint_generates_text(trained):
    from minimamba.training.data import load_tokenizer

    out, _ = trained
    tokenizer = load_tokenizer(out)
    model = MambaForCausalLM.from_pretrained(out)
    ids = np.array([tokenizer.encode("ROMEO.\n").ids])
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 300) and np.isfinite(logits).all()


def test_resume_gives_the_same_weights(tmp_path, trained):
    """Stop after 2 of 4 steps, --resume: the same weights as 4 steps in one go (same batches, lr, optimiser state)."""
    out_once, _ = trained
    out = tmp_path / "resumed"
    proc = train(out, 4, "--stop-after", 2)
    assert "--stop-after reached at step 2" in proc.stderr
    train(out, 4, "--resume")
    once = MambaForCausalLM.from_pretrained(out_once).state_dict()
    resumed = MambaForCausalLM.from_pretrained(out).state_dict()
    worst = max(float(np.abs(once[k] - resumed[k]).max()) for k in once)
    print(f"max abs difference, resumed vs uninterrupted: {worst:.2e}")
    assert worst == 0.0  # one thread, same operations in the same order: bit for bit


def test_train_errors_name_the_problem(tmp_path, trained):
    out, _ = trained
    proc = minimamba("train", "--text", tmp_path / "missing.txt", "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "not found" in proc.stderr
    proc = minimamba("train", "--text", TEXT, "--out", out, check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    proc = minimamba("train", "--text", TEXT, "--out", tmp_path / "fresh", "--resume", check=False)
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr
    proc = minimamba("train", "--text", TEXT, "--out", tmp_path / "y", "--seq-len", "100000", *TINY_ARGS[:8],
                     check=False)
    assert proc.returncode == 2 and "seq_len" in proc.stderr


def test_finetune_saves_a_peft_adapter_and_resumes(tmp_path, trained):
    base, _ = trained
    out = tmp_path / "lora"
    common = ["finetune", "--model", base, "--text", TEXT, "--out", out, "--lora-r", 4, "--seq-len", 24,
              "--batch-size", 2, "--eval-every", 2, "--save-every", 2, "--eval-batches", 1]
    minimamba(*common, "--steps", 2)
    minimamba(*common, "--steps", 4, "--resume", "--merge-to", tmp_path / "merged")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and set(cfg["target_modules"]) == {"x_proj", "embeddings",
                                                                                         "in_proj"}
    from minimamba.weights import read_safetensors

    keys = sorted(read_safetensors(out / "adapter_model.safetensors"))
    assert "base_model.model.backbone.layers.0.mixer.in_proj.lora_A.weight" in keys
    assert "base_model.model.backbone.embeddings.lora_embedding_B" in keys
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 4
    merged = MambaForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    original = MambaForCausalLM.from_pretrained(base).state_dict()
    assert not np.array_equal(merged["backbone.layers.0.mixer.in_proj.weight"],
                              original["backbone.layers.0.mixer.in_proj.weight"])
    assert np.array_equal(merged["backbone.layers.0.mixer.out_proj.weight"],
                          original["backbone.layers.0.mixer.out_proj.weight"])  # not a target: untouched


@pytest.mark.crosscheck
def test_transformers_loads_the_trained_checkpoint(trained):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out, _ = trained
    hf = transformers.MambaForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("ROMEO.\nWhat light", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf(ids).logits.numpy()
    ours = MambaForCausalLM.from_pretrained(out)(ids.numpy()).logits
    err = np.abs(ours - ref).max()
    print(f"logits max abs err vs transformers {err:.2e} (max |logit| {np.abs(ref).max():.2f})")
    assert err < 1e-4  # float32 both sides, tiny model: rounding only
