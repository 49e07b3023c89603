"""Kill `minimamba train` at every moment of a save (and at random moments), resume, and get the same bits.

A tiny run (2 steps, a checkpoint after each) is forked from this process (a
first run in-process has done the imports and loaded the Numba kernels, so a
forked run takes a fraction of a second). MINIMAMBA_KILL_AT=N makes the child SIGKILL itself at the Nth fault
point (every temp-file write, fsync and rename, the commit, every move into
place; see minimamba.atomic). After each kill: `--resume` (or a fresh start when
nothing was committed) must finish with model.safetensors and
optimizer.safetensors byte-identical to the uninterrupted run's, and no
temp or staging file left behind.
"""

import multiprocessing
import os
import random
import signal
import sys
import time

import pytest

from minimamba.atomic import KILL_AT_ENV, KILL_LOG_ENV, reset_fault_points
from minimamba.training.loop import STAGING_DIR, STATE_FILE

pytestmark = pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(),
                                reason="needs the forkserver start method")

HERE = os.path.dirname(__file__)
TEXT = os.path.join(HERE, "data", "shakespeare_tiny.txt")
STEPS = 2
ARGS = ["train", "--text", TEXT, "--steps", str(STEPS), "--save-every", "1", "--eval-every", "0",
        "--vocab-size", "300", "--hidden-size", "8", "--layers", "1", "--state-size", "4", "--seq-len", "16",
        "--batch-size", "2", "--log-every", "1", "--warmup", "1"]
COMPARED = ("model.safetensors", "optimizer.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")


def _child(argv, env):
    """The forked run: set the kill variables, silence the output, exit with minimamba's return code."""
    os.environ.update(env)
    reset_fault_points()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    from minimamba.cli import main

    sys.exit(main(argv))


@pytest.fixture(scope="module")
def forkserver():
    """A clean process that has imported minimamba's training code and forks a child per run.

    Forking pytest itself is unsafe once Numba has run a parallel kernel (GNU
    OpenMP aborts the child); a fresh interpreter per run costs a second of imports.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["minimamba.cli", "minimamba.training.grad", "minimamba.training.train_cli",
                                "tokenizers", __name__])
    return ctx


def run_child(ctx, out, *extra, env=None, kill_after_s=None):
    """`minimamba train` in a forked child with `env` set; its exit code (-9 when killed)."""
    proc = ctx.Process(target=_child, args=([*ARGS, "--out", str(out), *extra], env or {}))
    proc.start()
    if kill_after_s is not None:
        proc.join(kill_after_s)
        if proc.exitcode is None:
            proc.kill()
    proc.join()
    return proc.exitcode


def finish(ctx, out):
    """Resume after a kill (or start afresh when nothing was committed) and run to the end."""
    return run_child(ctx, out, *(["--resume"] if os.path.isfile(os.path.join(out, STATE_FILE)) else []))


def folder_bytes(out):
    return {name: open(os.path.join(out, name), "rb").read() for name in COMPARED}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, forkserver):
    """The uninterrupted run, and the list of its fault points."""
    out = tmp_path_factory.mktemp("kill") / "reference"
    log = str(out) + ".points"
    assert run_child(forkserver, out, env={KILL_AT_ENV: "-1", KILL_LOG_ENV: log}) == 0
    with open(log) as f:
        points = [line.split(" ", 1)[1].strip() for line in f]
    return folder_bytes(out), points


def check_killed_then_resumed(ctx, tmp_path, reference, name, **kill):
    expected, _ = reference
    out = tmp_path / name
    code = run_child(ctx, out, **kill)
    assert code in (-signal.SIGKILL, 0), code
    assert finish(ctx, out) == 0, f"{name}: the run after the kill failed"
    got = folder_bytes(out)
    differ = [k for k in COMPARED if got[k] != expected[k]]
    assert not differ, f"{name}: {differ} differ from the uninterrupted run"
    leftovers = [f for f in os.listdir(out) if f.startswith(".")]
    assert not leftovers, f"{name}: left behind {leftovers}"
    return code


def test_fault_points_cover_every_file_of_a_save(reference):
    _, points = reference
    per_save = len(points) // STEPS
    print(f"{len(points)} fault points, {per_save} per save: {points[:per_save]}")
    assert len(points) % STEPS == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors", STATE_FILE):
        assert f"rename {name}" in points and f"fsync {name}" in points, name


def test_kill_at_every_fault_point_of_a_save(forkserver, tmp_path, reference):
    """Every write, rename and move of the second save (a previous checkpoint to keep), two of the first save.

    (A kill just before an fsync leaves what a kill just after the write leaves: the
    page cache outlives the process. The slow test below tries those too.)
    """
    _, points = reference
    per_save = len(points) // STEPS
    first = [points.index(p) + 1 for p in ("write model.safetensors", "move model.safetensors")]
    chosen = first + [n for n in range(per_save + 1, 2 * per_save + 1) if not points[n - 1].startswith("fsync")]
    killed = 0
    for n in chosen:
        code = check_killed_then_resumed(forkserver, tmp_path, reference, f"at{n}", env={KILL_AT_ENV: str(n)})
        killed += code == -signal.SIGKILL
    print(f"killed at {killed} fault points ({len(chosen)} tried), each resumed bit-exactly")
    assert killed == len(chosen)


def test_kill_at_random_moments(forkserver, tmp_path, reference):
    rng = random.Random(0)
    t0 = time.perf_counter()
    assert run_child(forkserver, tmp_path / "timing") == 0
    duration = time.perf_counter() - t0
    kills = 0
    for i in range(3):
        code = check_killed_then_resumed(forkserver, tmp_path, reference, f"random{i}",
                                         kill_after_s=rng.uniform(0, duration))
        kills += code == -signal.SIGKILL
    print(f"3 random kills within a {duration:.2f} s run ({kills} landed before the run ended), all resumed "
          "bit-exactly")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MINIMAMBA_SLOW_TESTS") != "1", reason="about 3 minutes; MINIMAMBA_SLOW_TESTS=1")
def test_kill_at_every_fault_point_and_many_random_moments(forkserver, tmp_path, reference):
    _, points = reference
    for n in range(1, len(points) + 1):
        check_killed_then_resumed(forkserver, tmp_path, reference, f"at{n}", env={KILL_AT_ENV: str(n)})
    rng = random.Random(1)
    t0 = time.perf_counter()
    assert run_child(forkserver, tmp_path / "timing") == 0
    duration = time.perf_counter() - t0
    for i in range(30):
        check_killed_then_resumed(forkserver, tmp_path, reference, f"random{i}", kill_after_s=rng.uniform(0, duration))


def test_resume_into_a_broken_first_save_says_what_to_do(forkserver, tmp_path, reference, capsys):
    """Killed during the very first save: nothing is committed; --resume says to start again, a fresh start works."""
    from minimamba.cli import main

    _, points = reference
    out = tmp_path / "first"
    at = str(points.index("write model.safetensors") + 1)
    assert run_child(forkserver, out, env={KILL_AT_ENV: at}) == -signal.SIGKILL
    assert os.path.isdir(out / STAGING_DIR)
    assert main([*ARGS, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    print(err)
    assert "start again without --resume" in err
    assert run_child(forkserver, out) == 0


def test_a_damaged_checkpoint_file_is_named_on_resume(forkserver, tmp_path, reference, capsys):
    from minimamba.cli import main

    out = tmp_path / "damaged"
    assert run_child(forkserver, out, "--stop-after", "2") == 0
    with open(out / "optimizer.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    assert main([*ARGS, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    print(err)
    assert "optimizer.safetensors does not match the checkpoint of step 2" in err


FINETUNE = ["finetune", "--text", TEXT, "--steps", "2", "--save-every", "1", "--eval-every", "0", "--seq-len", "16",
            "--batch-size", "2", "--log-every", "1", "--warmup", "1", "--lora-r", "2"]
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "tokenizer.json")


def test_finetune_killed_while_saving_its_adapter_resumes_bit_exactly(forkserver, tmp_path):
    from minimamba import BUILTIN_MODEL_DIR

    def finetune(out, *extra, env=None):
        proc = forkserver.Process(target=_child, args=([*FINETUNE, "--model", BUILTIN_MODEL_DIR, "--out", str(out),
                                                        *extra], env or {}))
        proc.start()
        proc.join()
        return proc.exitcode

    log = str(tmp_path / "points")
    assert finetune(tmp_path / "reference", env={KILL_AT_ENV: "-1", KILL_LOG_ENV: log}) == 0
    with open(log) as f:
        points = [line.split(" ", 1)[1].strip() for line in f]
    per_save = len(points) // 2
    expected = {name: (tmp_path / "reference" / name).read_bytes() for name in ADAPTER_FILES}
    for label in ("write adapter_model.safetensors", "move adapter_model.safetensors"):  # before, after the commit
        at = per_save + points[per_save:].index(label) + 1  # in the second save
        out = tmp_path / f"at{at}"
        assert finetune(out, env={KILL_AT_ENV: str(at)}) == -signal.SIGKILL
        assert finetune(out, "--resume") == 0, label
        differ = [n for n in ADAPTER_FILES if (out / n).read_bytes() != expected[n]]
        assert not differ, f"killed at {label!r}: {differ} differ from the uninterrupted run"
