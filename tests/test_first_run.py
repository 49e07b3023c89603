"""A guest in the user's process, and a first hour without surprises.

Importing minimamba changes nothing; tune_threads() is the explicit opt-in; impl="auto" loads
Numba only when a call needs it; transformers' snippets run with the import line changed.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import minimamba
from minimamba import dispatch, ops

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def run_python(code, env=ENV, timeout=300):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_import_changes_no_environment_variable_and_loads_no_numba():
    out = run_python("import os, sys\n"
                     "before = dict(os.environ)\n"
                     "import minimamba\n"
                     "m = minimamba.MambaForCausalLM.from_pretrained('builtin')\n"
                     "tok = minimamba.Tokenizer.from_pretrained(minimamba.BUILTIN_MODEL_DIR)\n"
                     "m.generate(tok.encode('ROMEO:'), max_new_tokens=20)\n"
                     "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))\n"
                     "print(changed, 'numba' in sys.modules, m.kernels.name)\n").stdout
    assert out.split("]")[0] == "[", f"environment variables changed by import and a generation: {out}"
    if dispatch.numba_available():
        assert out.strip().endswith("False auto"), out  # a short generation on the built-in model: NumPy only


def test_tune_threads_is_explicit_and_leaves_the_environment_alone():
    pytest.importorskip("threadpoolctl", reason="tune_threads tunes OpenBLAS through threadpoolctl")
    pytest.importorskip("numba", reason="the Numba half needs numba")
    out = run_python("import os, numpy, minimamba\n"  # NumPy first: what a library user's program does
                     "before = dict(os.environ)\n"
                     "print(minimamba.threads.note())\n"
                     "print(minimamba.tune_threads())\n"
                     "from minimamba.kernels import cpu\n"
                     "print(minimamba.threads.note())\n"
                     "print(sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)))\n"
                     ).stdout.splitlines()
    print("\n".join(out))
    assert out[0].startswith("threads untuned")
    assert out[-1] == "[]"  # no variable left behind
    import threadpoolctl

    if any(i.get("internal_api") == "openblas" for i in threadpoolctl.threadpool_info()):
        assert "OPENBLAS_THREAD_TIMEOUT=20" in out[1]  # OpenBLAS re-read it although NumPy came first
    import numba

    if numba.config.THREADING_LAYER in ("default", "omp", "safe") and "omp" in out[2]:
        assert "GOMP_SPINCOUNT=10000" in out[2]


def test_auto_uses_numpy_below_the_crossover_and_numba_above(monkeypatch, capsys):
    """Per call: small work stays on NumPy without loading Numba; large work loads it (saying so when slow)."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(0)

    def scan_args(l, d=64, n=4):
        return (rng.standard_normal((1, d, l)), rng.standard_normal((1, d, l)), -np.exp(rng.standard_normal((d, n))),
                rng.standard_normal((1, n, l)), rng.standard_normal((1, n, l)))

    monkeypatch.setattr(dispatch, "_cpu", None)
    monkeypatch.setattr(dispatch, "_numpy_time_above", [0.0])
    monkeypatch.setattr(ops, "selective_scan_fn", lambda *a, **k: "numpy")
    kernels = dispatch.auto_kernels(("selective_scan_fn",))
    assert kernels.name == "auto"
    assert kernels.selective_scan_fn(*scan_args(1)) == "numpy"  # below the crossover
    assert kernels.selective_scan_fn(*scan_args(64, d=256, n=16)) == "numpy"  # above it, but not worth loading Numba yet
    assert dispatch._cpu is None and dispatch._numpy_time_above[0] > 0
    monkeypatch.undo()

    monkeypatch.setattr(dispatch, "_cpu", None)
    monkeypatch.setattr(dispatch, "_loaded", set())
    monkeypatch.setattr(dispatch, "SLOW_LOAD_S", 0.0)  # every load counts as slow: the message must appear
    monkeypatch.setattr(dispatch, "LOAD_NOW_WORK", 1)
    kernels = dispatch.auto_kernels(("selective_scan_fn",))
    big = scan_args(64, d=256, n=16)
    got = kernels.selective_scan_fn(*big, delta_softplus=True)
    assert dispatch.loaded()
    want = ops.selective_scan_fn(*big, delta_softplus=True)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"auto (Numba) vs NumPy scan, float64: rel err {err:.2e}")
    assert err < 1e-12  # float64: rounding only
    err_text = capsys.readouterr().err
    assert "minimamba: loading the Numba kernel selective_scan_fn" in err_text and "done in" in err_text


def test_transformers_snippets_run_on_the_builtin_model():
    """Both snippets of transformers' Mamba page, the import line changed and NumPy in place of torch."""
    code = """
from minimamba import pipeline

pipeline = pipeline(
    task="text-generation",
    model="builtin",
    dtype="float32",
    device="cpu",
)
print(pipeline("ROMEO:"))

from minimamba import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("builtin")
model = AutoModelForCausalLM.from_pretrained("builtin", dtype="float32", device_map="auto",)
input_ids = tokenizer("ROMEO:", return_tensors="np").to(model.device)

output = model.generate(**input_ids)
print(tokenizer.decode(output[0], skip_special_tokens=True))
"""
    out = run_python(code).stdout
    print(out)
    first, second = out.split("\n", 1)
    assert first.startswith("[{'generated_text': ") and "ROMEO:" in first
    assert second.startswith("ROMEO:") and len(second) > len("ROMEO:\n")


def test_torch_arguments_are_mapped_or_refused_in_one_line():
    from minimamba.auto import map_device, map_dtype

    class FakeTorchDtype:  # str(torch.float64) is "torch.float64"
        def __str__(self):
            return "torch.float64"

    assert map_dtype(FakeTorchDtype()) == "float64" and map_dtype("auto") == "float32"
    with pytest.warns(UserWarning, match="computes in float32"):
        assert map_dtype("torch.float16") == "float32"
    assert map_device(device=0) == "cupy" and map_device(device_map="auto") == "numpy"
    assert map_device(device_map={"": "cpu"}) == "numpy"
    with pytest.raises(ValueError, match="splits the model over devices"):
        map_device(device_map={"backbone": 0, "lm_head": "cpu"})
    with pytest.raises(ValueError, match="return_tensors='pt'"):
        minimamba.Tokenizer.from_pretrained(minimamba.BUILTIN_MODEL_DIR)("x", return_tensors="pt")
    with pytest.raises(ValueError, match="task 'summarization' is not supported"):
        minimamba.pipeline(task="summarization")


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "minimamba.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def test_help_shows_every_default_once():
    for command in ("generate", "train", "finetune", "bench"):
        text = cli(command, "--help").stdout
        assert "(default: True)" not in text and "(default: False)" not in text and "(default: None)" not in text
        assert "`" not in text, f"a stray backtick in {command} --help"
        options = text.split("options:")[1].split("\n  -")[1:]  # one entry per option
        assert len(options) > 5
        for entry in options:
            assert entry.count("default") <= 1, f"doubled default in {command} --help: -{entry}"
    generate = " ".join(cli("generate", "--help").stdout.split())
    assert "--max-new-tokens MAX_NEW_TOKENS stop after this many new tokens" in generate
    assert "(default: 100)" in generate
    assert "the prompt is printed first" in generate  # --no-echo says what it changes, not "(default: True)"
    train = " ".join(cli("train", "--help").stdout.split())
    assert "(default: 1000)" in train and "(default: 100)" in train  # steps, warmup
    finetune = " ".join(cli("finetune", "--help").stdout.split())
    assert "(default: 200)" in finetune and "(default: 20)" in finetune  # its own steps and warmup


def test_small_cli_things(tmp_path):
    zero = cli("generate", "ROMEO:", "--max-new-tokens", "0")
    assert zero.returncode == 0, zero.stderr
    assert "no new tokens (--max-new-tokens 0)" in zero.stderr and "not finished" not in zero.stderr
    empty = cli("generate", "ROMEO:", "--model", str(tmp_path))
    assert empty.returncode == 2 and "no model here" in empty.stderr, empty.stderr
    builtin = cli("generate", "ROMEO:", "--model", "builtin", "--max-new-tokens", "3", "--seed", "0")
    assert builtin.returncode == 0 and builtin.stdout.startswith("ROMEO:"), builtin.stderr


def test_warmup_longer_than_the_run_is_cut_with_a_warning(capsys):
    from minimamba.cli import build_parser
    from minimamba.training.train_cli import loop_options

    args = build_parser().parse_args(["train", "--text", "t.txt", "--out", "o", "--steps", "20"])
    opts = loop_options(args)
    assert opts.warmup == 2
    assert "--warmup 100 is longer than the run (--steps 20)" in capsys.readouterr().err


def test_ctrl_c_while_importing_prints_no_traceback(tmp_path):
    """The `minimamba` command interrupted while Python loads NumPy & co: one line, no traceback."""
    script = tmp_path / "minimamba"  # the console script's name is what turns the quiet hook on
    script.write_text("import signal, os, sys, builtins\n"
                      "real_import = builtins.__import__\n"
                      "def interrupting(name, *a, **k):\n"
                      "    if name == 'numpy':\n"
                      "        raise KeyboardInterrupt\n"
                      "    return real_import(name, *a, **k)\n"
                      "builtins.__import__ = interrupting\n"
                      "from minimamba.cli import main\n"
                      "sys.exit(main())\n")
    result = subprocess.run([sys.executable, str(script), "generate", "x"], capture_output=True, text=True, env=ENV,
                            timeout=120)
    print(result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "interrupted" in result.stderr
    assert result.returncode != 0


def test_training_speaks_from_the_first_second(tmp_path):
    """Every slow stage before the first step (reading, the tokenizer, encoding, the first step) is announced."""
    text = os.path.join(os.path.dirname(__file__), "data", "shakespeare_tiny.txt")
    proc = cli("train", "--text", text, "--out", str(tmp_path / "run"), "--steps", "2", "--vocab-size", "300",
               "--hidden-size", "16", "--layers", "1", "--state-size", "4", "--seq-len", "16", "--batch-size", "1",
               "--eval-every", "0", "--log-every", "1", timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[")]  # the timed stage lines
    print("\n".join(lines[:6]))
    assert "reading" in lines[0]
    seconds = float(lines[0][1:].split("s]")[0])
    assert seconds < 5  # the first line comes before any slow work
    stages = " ".join(lines[:4])
    assert "BPE tokenizer" in stages and "step 1 of 2" in stages
    assert "--warmup 100 is longer than the run (--steps 2)" in proc.stderr


def test_pipeline_refuses_what_it_cannot_pass_on():
    """revision= and cache_dir= would be dropped on the way to load(): refused, naming them."""
    with pytest.raises(ValueError, match="revision: not supported by minimamba.pipeline"):
        minimamba.pipeline("text-generation", model="builtin", revision="main")
