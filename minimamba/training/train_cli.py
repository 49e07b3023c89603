"""`minimamba train --text FILE --out DIR`: train a Mamba LM from scratch, in NumPy.

    minimamba train --text shakespeare.txt --out my-mamba --steps 2000
    minimamba train --text shakespeare.txt --out my-mamba --steps 2000 --resume   # after an interruption

The folder gets config.json, model.safetensors, tokenizer.json (the HF layout,
which transformers' MambaForCausalLM and AutoTokenizer load), plus
optimizer.safetensors and trainer_state.json for --resume.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

from ..helpfmt import DefaultsHelpFormatter
from .loop import LoopOptions, has_checkpoint, recover, run, stage, verify_checkpoint


def add_train_parser(sub):
    p = sub.add_parser("train", help="train a Mamba language model from scratch on a text file (NumPy, no PyTorch)",
                       description=__doc__.split("\n\n")[0].replace("`", ""), formatter_class=DefaultsHelpFormatter)
    p.add_argument("--text", required=True, help="UTF-8 text file to train on")
    p.add_argument("--out", required=True, help="output folder for checkpoints")
    p.add_argument("--tokenizer", help="an existing tokenizer.json (or a folder holding one) "
                                       "(default: train a byte-level BPE on the training text)")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size when training a tokenizer")
    p.add_argument("--hidden-size", type=int, default=256, help="d, the residual width")
    p.add_argument("--layers", type=int, default=4, help="number of Mamba blocks")
    p.add_argument("--state-size", type=int, default=16, help="n, the SSM state per channel")
    p.add_argument("--expand", type=int, default=2, help="e = expand * d")
    p.add_argument("--conv-kernel", type=int, default=4, help="k, the causal conv's width")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of the text held out for validation")
    _add_loop_args(p)
    p.set_defaults(func=cmd_train)


def _add_loop_args(p):
    d = LoopOptions()
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps (time one with --stop-after 5 first)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help="linear warmup steps (a warmup longer than --steps is cut to a tenth of the run)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW's decoupled weight decay")
    p.add_argument("--clip", type=float, default=d.clip, help="max global gradient norm (0: no clipping)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between validation losses")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches, help="batches per validation loss")
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between progress lines when not on a terminal")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the weights, batches and dropout")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop (with a checkpoint) after this long (0: no limit)")
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop (with a checkpoint) after this step; the schedule still plans for --steps (0: off)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")


def loop_options(args) -> LoopOptions:
    opts = LoopOptions(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                       grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                       clip=args.clip, eval_every=args.eval_every, eval_batches=args.eval_batches,
                       save_every=args.save_every, log_every=args.log_every, seed=args.seed,
                       max_minutes=args.max_minutes, stop_after=args.stop_after)
    for name in ("steps", "batch_size", "seq_len", "grad_accum"):
        if getattr(opts, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}")
    if opts.seq_len < 2:
        raise ValueError("--seq-len must be at least 2 (a next-token loss needs two tokens)")
    if not opts.lr > 0:
        raise ValueError(f"--lr must be positive, got {opts.lr}")
    if opts.warmup > opts.steps:  # the run would end before the learning rate reached its peak
        warmup = opts.steps // 10
        print(f"warning: --warmup {opts.warmup} is longer than the run (--steps {opts.steps}); using {warmup} "
              "warmup steps (a tenth of the run), so the learning rate reaches its peak", file=sys.stderr)
        opts.warmup = warmup
    return opts


def check_out_dir(out, resume):
    """Refuse a wrong --out early; finish or discard a save a kill interrupted; check a checkpoint to resume.

    Returns the checkpoint's verified trainer state when resuming (for `loop.run(verified_state=)`), else None.
    """
    if os.path.isfile(out):
        raise ValueError(f"--out {out} is a file; give a folder")
    note = recover(out) if os.path.isdir(out) else None
    if note:
        print(note, flush=True)
    if resume and not has_checkpoint(out):
        hint = ("; a first save was interrupted before it completed, so start again without --resume"
                if note else "")  # with no checkpoint, recover() only ever removes an uncommitted save
        raise FileNotFoundError(f"--resume: no checkpoint (trainer_state.json) in {out}{hint}")
    if not resume and has_checkpoint(out):
        raise ValueError(f"{out} already holds a training checkpoint; pass --resume to continue it "
                         "or choose another --out")
    return verify_checkpoint(out) if resume else None


def cmd_train(args):
    from ..config import MambaConfig
    from ..model import init_weights
    from ..weights import load_state_dict, save_pretrained
    from . import data
    from .grad import TrainingModel

    opts = loop_options(args)
    verified = check_out_dir(args.out, args.resume)
    stage(f"reading {args.text}")
    text = data.read_text(args.text)
    train_text, val_text = data.split_text(text, args.val_fraction)
    if args.resume:
        tokenizer = data.load_tokenizer(args.out)
        config = MambaConfig.from_pretrained(args.out)
        params = load_state_dict(args.out, config)
    else:
        if args.tokenizer:
            tokenizer = data.load_tokenizer(args.tokenizer)
        else:
            stage(f"training a {args.vocab_size}-token BPE tokenizer on {len(train_text):,} characters")
            tokenizer = data.train_tokenizer(train_text, args.vocab_size)
        vocab = tokenizer.get_vocab_size()
        eos = tokenizer.token_to_id(data.EOS_TOKEN)
        config = MambaConfig(vocab_size=vocab, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                             state_size=args.state_size, expand=args.expand, conv_kernel=args.conv_kernel,
                             initializer_range=0.02,  # std of the embedding, as mamba_ssm (HF's default 0.1 is for fine-tuning)
                             bos_token_id=eos if eos is not None else 0, eos_token_id=eos if eos is not None else 0,
                             pad_token_id=eos if eos is not None else 0)
        params = init_weights(config, seed=args.seed)
    params = {k: np.array(v, dtype=np.float32) for k, v in params.items()}  # writable float32 copies
    stage("encoding the text")
    train_ids = data.encode(tokenizer, train_text)
    val_ids = data.encode(tokenizer, val_text)
    if train_ids.max(initial=0) >= config.vocab_size:
        raise ValueError(f"the tokenizer makes id {int(train_ids.max())} but the model's vocab_size is "
                         f"{config.vocab_size}")
    model = TrainingModel(config, params)
    n_params = sum(v.size for v in params.values())
    print(f"model: {n_params:,} parameters (d={config.hidden_size}, layers={config.num_hidden_layers}, "
          f"n={config.state_size}, V={config.vocab_size}); text: {len(train_ids):,} training and "
          f"{len(val_ids):,} validation tokens", flush=True)

    def save_checkpoint(folder):
        save_pretrained(folder, config, params)
        data.save_tokenizer(tokenizer, folder)

    extra = {"command": "train", "text": os.path.abspath(args.text), "parameters": n_params,
             "train_tokens_in_text": int(len(train_ids)), "val_tokens_in_text": int(len(val_ids))}
    state = run(model, train_ids, val_ids, opts, args.out, save_checkpoint, resume=args.resume, extra_state=extra,
                verified_state=verified)
    summary = {k: state.get(k) for k in ("step", "train_loss", "val_loss", "tokens_per_s", "train_seconds")}
    if state.get("val_loss") is not None:
        summary["val_perplexity"] = math.exp(state["val_loss"])
    print(json.dumps(summary, indent=1))
    return 0
