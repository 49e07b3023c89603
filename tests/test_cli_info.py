"""`minimamba info`, run as a user runs it: a subprocess."""

import os
import subprocess
import sys

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def run(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "minimamba.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_info_prints_the_figures():
    result = run("info", os.path.join(FIXTURES, "odd"))
    print(result.stdout, result.stderr)
    assert result.returncode == 0
    out = result.stdout
    # parameters of the odd fixture, counted by hand: embeddings 61*24, 3 layers of
    # norm 24 + in_proj 96*24 + 96 + conv 48*2 + x_proj 11*48 + dt_proj 48*5 + 48 + A 48*3 + D 48 + out 24*48 + 24,
    # norm_f 24
    per_layer = 24 + 96 * 24 + 96 + 48 * 2 + 11 * 48 + 48 * 5 + 48 + 48 * 3 + 48 + 24 * 48 + 24
    n_params = 61 * 24 + 3 * per_layer + 24
    assert f"parameters   {n_params:,}" in out
    assert "layers       3" in out and "hidden_size  24 (d)" in out and "time_step_rank 5 (r)" in out
    assert "stored as    float32" in out


def test_info_on_bf16_and_state_spaces():
    assert "stored as    bfloat16 (read as float32, exactly)" in run("info", os.path.join(FIXTURES, "bf16")).stdout
    result = run("info", os.path.join(FIXTURES, "state_spaces"))
    assert result.returncode == 0 and "vocab_size   64" in result.stdout


def test_info_on_a_missing_folder_fails_with_a_message(tmp_path):
    result = run("info", str(tmp_path / "nowhere"))
    assert result.returncode != 0
    assert "minimamba info: error: model not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_info_on_a_broken_checkpoint_fails_with_a_message(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00")
    result = run("info", str(tmp_path))
    assert result.returncode != 0 and "too short to be a safetensors file" in result.stderr
