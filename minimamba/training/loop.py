"""The training loop shared by `minimamba train` and `minimamba finetune`.

One step: `grad_accum` micro-batches through forward + backward (gradients
averaged), clip the global norm, AdamW with the warmup + cosine learning rate.
Every `eval_every` steps the validation loss; every `save_every` steps (and at
the end, and when the time limit is reached) a checkpoint. A checkpoint is the
model in the HF layout (or the LoRA adapter in PEFT's), plus
`optimizer.safetensors` and `trainer_state.json` (step, the batch sampler's and
the dropout generator's states), so a resumed run continues with exactly the
numbers the uninterrupted run would have used.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from .data import BatchSampler, validation_batches
from .optim import AdamW, clip_grad_norm, lr_at

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


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
        stream=None):
    """Train `model` (a grad.TrainingModel) and checkpoint into `out_dir` with `save_checkpoint(out_dir)`.

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
        state = _load_state(out_dir, optimizer, sampler, dropout_rng, state)
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
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_checkpoint(out_dir)
    arrays = {k: np.ascontiguousarray(v) for k, v in optimizer.state_arrays().items()}
    tmp = os.path.join(out_dir, OPTIMIZER_FILE + ".tmp")
    save_file(arrays, tmp)
    os.replace(tmp, os.path.join(out_dir, OPTIMIZER_FILE))
    state = dict(state, optimizer_step=optimizer.step_count, sampler_rng=sampler.rng.bit_generator.state,
                 dropout_rng=dropout_rng.bit_generator.state)
    tmp = os.path.join(out_dir, STATE_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, STATE_FILE))


def _load_state(out_dir, optimizer, sampler, dropout_rng, state):
    from safetensors.numpy import load_file

    path = os.path.join(out_dir, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: {path} not found; there is no checkpoint to resume in {out_dir}")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    optimizer.load_state_arrays(load_file(os.path.join(out_dir, OPTIMIZER_FILE)), saved["optimizer_step"])
    sampler.rng.bit_generator.state = saved.pop("sampler_rng")
    dropout_rng.bit_generator.state = saved.pop("dropout_rng")
    saved.pop("optimizer_step")
    saved["options"] = state["options"]
    return saved


def has_checkpoint(out_dir) -> bool:
    return os.path.isfile(os.path.join(out_dir, STATE_FILE))
