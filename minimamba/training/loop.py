"""The training loop shared by `minimamba train` and `minimamba finetune`.

One step: `grad_accum` micro-batches through forward + backward (gradients
averaged), clip the global norm, AdamW with the warmup + cosine learning rate.
Every `eval_every` steps the validation loss; every `save_every` steps (and at
the end, and when the time limit is reached) a checkpoint. A checkpoint is the
model in the HF layout (or the LoRA adapter in PEFT's), plus
`optimizer.safetensors` and `trainer_state.json` (step, the batch sampler's and
the dropout generator's states, every file's SHA-256), so a resumed run continues
with exactly the numbers the uninterrupted run would have used. The state file is
written last and commits the step: a kill at any moment of a save leaves the
previous checkpoint or the new one (see `_save`).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..atomic import fault_point, fsync_dir, remove_temp_files, sha256_file, write_json
from ..errors import CheckpointError, read_json_file
from .data import BatchSampler, validation_batches
from .optim import AdamW, clip_grad_norm, lr_at

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STAGING_DIR = ".checkpoint-staging"  # a save in progress; see _save


@dataclass
class LoopOptions:
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 2e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    max_minutes: float = 0.0  # 0: no limit
    stop_after: int = 0  # stop (with a checkpoint) after this step, the schedule still planned for `steps`; 0: no


class Progress:
    """One line of progress: step, loss, lr, tokens/s; redrawn in place on a terminal, a line per log_every otherwise."""

    def __init__(self, total, log_every, stream=None):
        self.total = total
        self.log_every = log_every
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, step, loss, lr, tokens_per_s, elapsed):
        done = step / self.total
        bar = "#" * int(24 * done) + "." * (24 - int(24 * done))
        eta = elapsed / max(done, 1e-9) * (1 - done) if done > 0 else 0.0
        line = (f"[{bar}] step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
                f"{tokens_per_s:,.0f} tok/s elapsed {elapsed / 60:.1f} min eta {eta / 60:.1f} min")
        if self.tty:
            self.stream.write("\r" + line)
            self.stream.flush()
        elif step % self.log_every == 0 or step == self.total:
            self.stream.write(line + "\n")
            self.stream.flush()

    def message(self, text):
        self.stream.write(("\n" if self.tty else "") + text + "\n")
        self.stream.flush()


_START = time.perf_counter()


def stage(text, stream=None):
    """A line on stderr before each slow step, timed from the start, so a run is never silent."""
    stream = stream or sys.stderr
    stream.write(f"[{time.perf_counter() - _START:6.1f} s] {text} ...\n")
    stream.flush()


def evaluate(model, val_ids, batch_size, seq_len, max_batches) -> float:
    """Mean validation loss over the fixed held-out windows (token-weighted)."""
    total, count = 0.0, 0
    for batch in validation_batches(val_ids, batch_size, seq_len, max_batches):
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += model.loss(batch) * n
        count += n
    return total / count


def run(model, train_ids, val_ids, opts: LoopOptions, out_dir, save_checkpoint, resume=False, extra_state=None,
        stream=None, verified_state=None):
    """Train `model` (a grad.TrainingModel) and checkpoint into `out_dir` with `save_checkpoint(out_dir)`.

    `verified_state`: what `verify_checkpoint(out_dir)` returned just before (the CLI checks the
    files before it loads the weights), so a resume does not hash every file a second time.

    Returns a summary dict (final step, losses, tokens/s) that is also written to trainer_state.json.
    """
    params = model.trainable()
    optimizer = AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    sampler = BatchSampler(train_ids, opts.batch_size, opts.seq_len, seed=opts.seed)
    dropout_rng = np.random.default_rng(opts.seed + 1)
    state = {"step": 0, "history": [], "options": asdict(opts), "train_seconds": 0.0, "train_tokens": 0}
    if extra_state:
        state.update(extra_state)
    if resume:
        state = _load_state(out_dir, optimizer, sampler, dropout_rng, state, verified_state)
    progress = Progress(opts.steps, opts.log_every, stream)
    tokens_per_step = opts.batch_size * opts.seq_len * opts.grad_accum
    deadline = time.time() + opts.max_minutes * 60 if opts.max_minutes else math.inf
    if state["step"] >= opts.steps:
        progress.message(f"already at step {state['step']} of {opts.steps}: nothing to do")
    window_t, window_tokens = time.perf_counter(), 0
    loss = float("nan")
    if state["step"] < opts.steps:
        stage(f"step {state['step'] + 1} of {opts.steps} ({tokens_per_step:,} tokens a step; the first also loads "
              "the Numba kernels, compiling them on a first run)", stream)
    while state["step"] < opts.steps:
        t0 = time.perf_counter()
        step = state["step"]
        lr = lr_at(step, opts.lr, opts.warmup, opts.steps, opts.min_lr_ratio)
        grads, loss = None, 0.0
        for _ in range(opts.grad_accum):
            micro_loss, micro_grads = model.loss_and_grad(sampler.next(), rng=dropout_rng)
            loss += micro_loss / opts.grad_accum
            if grads is None:
                grads = micro_grads
            else:
                for k in grads:
                    grads[k] += micro_grads[k]
        if opts.grad_accum > 1:
            for g in grads.values():
                g /= opts.grad_accum
        if not math.isfinite(loss):
            raise RuntimeError(f"the loss became {loss} at step {step}; lower --lr or raise --warmup")
        grad_norm = clip_grad_norm(grads, opts.clip)
        optimizer.step(grads, lr)
        state["step"] = step + 1
        dt = time.perf_counter() - t0
        state["train_seconds"] += dt
        state["train_tokens"] += tokens_per_step
        window_tokens += tokens_per_step
        now = time.perf_counter()
        tok_s = window_tokens / (now - window_t)
        if state["step"] % opts.log_every == 0:
            state["history"].append({"step": state["step"], "loss": round(loss, 5), "lr": lr,
                                     "grad_norm": round(grad_norm, 4), "tokens_per_s": round(tok_s, 1)})
            window_t, window_tokens = now, 0
        progress.update(state["step"], loss, lr, tok_s, state["train_seconds"])
        stop_early = state["step"] == opts.stop_after or time.time() > deadline
        last = state["step"] == opts.steps or stop_early
        if opts.eval_every and (state["step"] % opts.eval_every == 0 or last):
            val = evaluate(model, val_ids, opts.batch_size, opts.seq_len, opts.eval_batches)
            state["history"].append({"step": state["step"], "val_loss": round(val, 5),
                                     "val_perplexity": round(math.exp(val), 3)})
            state["val_loss"] = val
            progress.message(f"step {state['step']}: val loss {val:.4f} (perplexity {math.exp(val):.2f})")
            window_t, window_tokens = time.perf_counter(), 0  # evaluation time is not training time
        if last or (opts.save_every and state["step"] % opts.save_every == 0):
            state["train_loss"] = loss
            _save(out_dir, save_checkpoint, optimizer, sampler, dropout_rng, state)
            progress.message(f"step {state['step']}: checkpoint saved to {out_dir}")
        if stop_early and state["step"] < opts.steps:
            why = "--stop-after" if state["step"] == opts.stop_after else f"time limit of {opts.max_minutes} min"
            progress.message(f"{why} reached at step {state['step']}; rerun with --resume to continue")
            break
    state["tokens_per_s"] = state["train_tokens"] / max(state["train_seconds"], 1e-9)
    return state


def _save(out_dir, save_checkpoint, optimizer, sampler, dropout_rng, state):
    """Write a checkpoint so that a kill at any moment leaves the previous one or this one, whole.

    1. Every file (save_checkpoint's, the optimizer's) goes into the hidden folder
       STAGING_DIR, each written atomically (temp file, fsync, rename).
    2. trainer_state.json, naming every file with its SHA-256, replaces the old one
       atomically: the commit. Before it, the folder still holds step s, whole.
    3. The staged files are moved into place. A kill here is finished by `recover`
       (the state file says which contents each file must have).
    """
    from ..weights import write_safetensors

    os.makedirs(out_dir, exist_ok=True)
    recover(out_dir)
    staging = os.path.join(out_dir, STAGING_DIR)
    os.makedirs(staging)
    save_checkpoint(staging)
    write_safetensors(os.path.join(staging, OPTIMIZER_FILE), optimizer.state_arrays())
    files = {name: sha256_file(os.path.join(staging, name)) for name in sorted(os.listdir(staging))}
    fsync_dir(staging)
    state = dict(state, optimizer_step=optimizer.step_count, sampler_rng=sampler.rng.bit_generator.state,
                 dropout_rng=dropout_rng.bit_generator.state, files=files)
    write_json(os.path.join(out_dir, STATE_FILE), state, indent=1)  # the commit point
    _move_staged(out_dir, files)


def _move_staged(out_dir, files):
    staging = os.path.join(out_dir, STAGING_DIR)
    for name in files:
        if os.path.exists(os.path.join(staging, name)):
            fault_point(f"move {name}")
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    fsync_dir(out_dir)
    shutil.rmtree(staging, ignore_errors=True)


def _read_state(out_dir) -> dict:
    state = read_json_file(os.path.join(out_dir, STATE_FILE), STATE_FILE)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{os.path.join(out_dir, STATE_FILE)}: no step number; not a minimamba training state")
    return state


def recover(out_dir) -> str | None:
    """Finish or discard a save that a kill interrupted; remove stray temp files. Returns what it did, if anything.

    A staged file whose hash trainer_state.json records was committed: it is moved
    into place. Any other staged file belongs to a save that never committed: the
    staging folder is deleted, and the folder holds the previous checkpoint as it was.
    """
    remove_temp_files(out_dir)
    staging = os.path.join(out_dir, STAGING_DIR)
    if not os.path.isdir(staging):
        return None
    remove_temp_files(staging)
    staged = sorted(os.listdir(staging))
    files = {}
    if has_checkpoint(out_dir):
        files = _read_state(out_dir).get("files") or {}
    if staged and all(name in files and sha256_file(os.path.join(staging, name)) == files[name] for name in staged):
        _move_staged(out_dir, files)
        return f"finished moving the files of an interrupted save of {out_dir} into place"
    shutil.rmtree(staging)
    return f"removed the files of a save to {out_dir} that was interrupted before it completed"


def verify_checkpoint(out_dir) -> dict:
    """The committed trainer state, after checking every file it names against its recorded SHA-256."""
    state = _read_state(out_dir)
    files = state.get("files")
    if files is None:
        return state  # written before checkpoints recorded their files: nothing to compare
    if not isinstance(files, dict):
        raise CheckpointError(f"{os.path.join(out_dir, STATE_FILE)}: 'files' must map file names to SHA-256 hashes")
    for name, digest in files.items():
        path = os.path.join(out_dir, check_file_name(name, out_dir))
        if not os.path.isfile(path) or sha256_file(path) != digest:
            why = "is missing" if not os.path.isfile(path) else "does not match the checkpoint"
            raise CheckpointError(f"{path} {why} of step {state['step']} (changed or damaged since it was saved); "
                                  f"restore the file, or start a new run in another --out folder")
    return state


def check_file_name(name, out_dir) -> str:
    if not isinstance(name, str) or not name or name != os.path.basename(name) or name in (".", ".."):
        raise CheckpointError(f"{os.path.join(out_dir, STATE_FILE)}: lists a file name that is not a plain "
                              "file name in the folder")
    return name


def _load_state(out_dir, optimizer, sampler, dropout_rng, state, verified_state=None):
    from ..weights import read_safetensors

    if verified_state is not None:
        saved = dict(verified_state)
    else:
        recover(out_dir)
        if not has_checkpoint(out_dir):
            raise FileNotFoundError(f"--resume: {os.path.join(out_dir, STATE_FILE)} not found; there is no "
                                    f"checkpoint to resume in {out_dir}")
        saved = verify_checkpoint(out_dir)
    try:
        optimizer.load_state_arrays(read_safetensors(os.path.join(out_dir, OPTIMIZER_FILE)), saved["optimizer_step"])
        sampler.rng.bit_generator.state = saved.pop("sampler_rng")
        dropout_rng.bit_generator.state = saved.pop("dropout_rng")
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{out_dir}: the optimizer or generator state does not fit this run "
                              f"({type(err).__name__}); start a new run in another --out folder") from None
    saved.pop("optimizer_step")
    saved["options"] = state["options"]
    return saved


def has_checkpoint(out_dir) -> bool:
    """A committed checkpoint: its trainer_state.json exists (it is written last)."""
    return os.path.isfile(os.path.join(out_dir, STATE_FILE))
