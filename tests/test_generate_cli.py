"""`minimamba generate` end to end, in a subprocess, on a tiny checkpoint with its own tokenizer."""

import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest
from text_fixtures import text_checkpoint  # noqa: F401 - fixture

from minimamba import generate_text

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
SPEED = re.compile(r"^prefill \d+ tokens [\d.]+ s \(\d+ tokens/s\) \| decode \d+ tokens [\d.]+ s \([\d.]+ tokens/s\)")


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "minimamba.cli", "generate", *args], input=stdin,
                          capture_output=True, text=True, encoding="utf-8", env=ENV, timeout=120)


def test_greedy_run_prints_the_text_and_the_speed(text_checkpoint):
    prompt = "ROMEO: Is the day"
    run = cli(prompt, "--model", text_checkpoint, "--max-new-tokens", "12", "--temperature", "0",
              "--ignore-eos", "--impl", "numpy")
    assert run.returncode == 0, run.stderr
    expected = generate_text(prompt, model=text_checkpoint, max_new_tokens=12, eos_token_id=[])
    assert run.stdout == expected + "\n"
    last = run.stderr.strip().splitlines()[-1]
    print(run.stdout, last)
    assert SPEED.match(last) and "decode 11 tokens" in last, last


def test_prompt_from_stdin_and_seed(text_checkpoint):
    args = ("-", "--model", text_checkpoint, "--max-new-tokens", "15", "--seed", "4", "--top-k", "20",
            "--no-echo", "--impl", "numpy")
    a, b = cli(*args, stdin="JULIET:"), cli(*args, stdin="JULIET:")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    expected = generate_text("JULIET:", model=text_checkpoint, max_new_tokens=15, do_sample=True, temperature=0.8,
                             top_k=20, seed=4, return_full_text=False)
    assert a.stdout == expected + "\n"


@pytest.mark.parametrize("args, message", [
    (("--model", "/nonexistent/model"), "not found. Looked locally"),
    (("--model", "nobody/no-such-model"), "online: skipped because HF_HUB_OFFLINE"),
    (("--top-p", "1.5"), "argument --top-p: 1.5 is not in (0, 1]"),
    (("--top-p", "0"), "argument --top-p"),
    (("--temperature", "-1"), "argument --temperature"),
    (("--max-new-tokens", "-3"), "argument --max-new-tokens"),
    (("--top-k", "two"), "argument --top-k: 'two' is not an integer"),
    (("--repetition-penalty", "0"), "argument --repetition-penalty"),
    (("--dtype", "float16"), "argument --dtype"),
])
def test_bad_input_exits_with_a_message(text_checkpoint, args, message):
    if "--model" not in args:
        args = ("--model", text_checkpoint) + args
    run = cli("hello", *args)
    assert run.returncode != 0
    assert message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_hub_repo_id_from_the_cache(tmp_path, text_checkpoint):
    """`--model owner/name` found in the Hugging Face cache (laid out as huggingface_hub does), offline."""
    import shutil

    repo = tmp_path / "hub" / "models--someone--tiny-text"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(text_checkpoint, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = dict(ENV, HF_HUB_CACHE=str(tmp_path / "hub"))
    run = subprocess.run([sys.executable, "-m", "minimamba.cli", "generate", "ROMEO:", "--model", "someone/tiny-text",
                          "--max-new-tokens", "5", "--temperature", "0", "--ignore-eos", "--impl", "numpy"],
                         capture_output=True, text=True, encoding="utf-8", env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == generate_text("ROMEO:", model=text_checkpoint, max_new_tokens=5, eos_token_id=[]) + "\n"


def test_folder_without_tokenizer(tmp_path, text_checkpoint):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes(open(os.path.join(text_checkpoint, name), "rb").read())
    run = cli("hello", "--model", str(folder))
    assert run.returncode != 0 and "has no tokenizer.json" in run.stderr and "Traceback" not in run.stderr
    # --tokenizer names one elsewhere
    run = cli("hello", "--model", str(folder), "--tokenizer", os.path.join(text_checkpoint, "tokenizer.json"),
              "--max-new-tokens", "3", "--impl", "numpy")
    assert run.returncode == 0, run.stderr


def test_ctrl_c_keeps_the_text_and_exits_130(text_checkpoint):
    prompt = "ROMEO:"
    proc = subprocess.Popen([sys.executable, "-m", "minimamba.cli", "generate", prompt, "--model", text_checkpoint,
                             "--max-new-tokens", "1000000", "--ignore-eos", "--impl", "numpy"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    got = b""
    deadline = time.monotonic() + 120
    try:
        while len(got) < len(prompt) + 20 and time.monotonic() < deadline:  # the prompt, then generated text
            if select.select([proc.stdout], [], [], 1.0)[0]:
                got += os.read(proc.stdout.fileno(), 4096)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout, stderr = (got + out).decode("utf-8", "replace"), err.decode()
    assert proc.returncode == 130, stderr
    assert stdout.startswith(prompt) and len(got + out) > len(prompt) + 20  # bytes: what was printed stays
    assert "interrupted" in stderr and "Traceback" not in stderr
