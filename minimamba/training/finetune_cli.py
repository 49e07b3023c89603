"""`minimamba finetune --model M --text FILE --lora-r 8`: LoRA fine-tuning, base weights frozen.

    minimamba finetune --model minimamba/builtin --text sonnets.txt --out sonnet-lora --lora-r 8
    minimamba finetune ... --resume            # continue from the last checkpoint in --out
    minimamba finetune ... --merge-to merged/  # also write base + adapter as an ordinary checkpoint

The adapter is saved in PEFT's format (adapter_config.json +
adapter_model.safetensors), which `peft.PeftModel.from_pretrained(transformers_model, out)` loads.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from ..helpfmt import DefaultsHelpFormatter
from .loop import run, stage
from .train_cli import _add_loop_args, check_out_dir, loop_options


def add_finetune_parser(sub):
    p = sub.add_parser("finetune", help="LoRA fine-tuning of a Mamba checkpoint on a text file (NumPy, no PyTorch)",
                       description=__doc__.split("\n\n")[0].replace("`", ""), formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="base checkpoint folder, Hub repo id, or 'builtin'")
    p.add_argument("--text", required=True, help="UTF-8 text file to fine-tune on")
    p.add_argument("--out", required=True, help="output folder for the adapter and checkpoints")
    p.add_argument("--tokenizer", help="tokenizer.json or folder (default: the model folder's)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (the update is scaled by alpha / r)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapters' inputs")
    p.add_argument("--lora-targets", default="x_proj,embeddings,in_proj",
                   help="comma-separated modules among x_proj, embeddings, in_proj, dt_proj, out_proj "
                        "(PEFT refuses out_proj on Mamba, so adapters with it load only here)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of the text held out for validation")
    p.add_argument("--merge-to", help="after training, also save base + adapter merged into this folder")
    _add_loop_args(p)
    p.set_defaults(func=cmd_finetune, lr=1e-3, warmup=20, steps=200, weight_decay=0.0)


def cmd_finetune(args):
    from ..config import MambaConfig
    from ..weights import load_state_dict, resolve_model_dir, save_pretrained
    from . import data, lora
    from .grad import TrainingModel

    opts = loop_options(args)
    verified = check_out_dir(args.out, args.resume)
    stage(f"loading {args.model}")
    folder = resolve_model_dir(args.model)  # a folder, a Hub id or "builtin"
    config = MambaConfig.from_pretrained(folder)
    params = {k: np.array(v, dtype=np.float32) for k, v in load_state_dict(folder, config).items()}
    tokenizer = data.load_tokenizer(args.tokenizer or folder)
    text = data.read_text(args.text)
    train_text, val_text = data.split_text(text, args.val_fraction)
    train_ids, val_ids = data.encode(tokenizer, train_text), data.encode(tokenizer, val_text)
    if train_ids.max(initial=0) >= config.vocab_size:
        raise ValueError(f"the tokenizer makes id {int(train_ids.max())} but the model's vocab_size is "
                         f"{config.vocab_size}: wrong --tokenizer for this model?")
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if args.resume:
        adapters = lora.load_adapter(args.out, config, params)
    else:
        adapters = lora.add_adapters(config, params, targets, r=args.lora_r, alpha=args.lora_alpha,
                                     dropout=args.lora_dropout, seed=args.seed)
    model = TrainingModel(config, params, adapters=adapters)
    n_lora = sum(v.size for v in model.trainable().values())
    print(f"LoRA r={args.lora_r} alpha={args.lora_alpha} on {', '.join(targets)}: {n_lora:,} trainable parameters "
          f"({n_lora / sum(v.size for v in params.values()):.2%} of the base); {len(train_ids):,} training tokens",
          flush=True)

    def save_checkpoint(out):
        lora.save_adapter(out, adapters, base_model_name_or_path=str(args.model))
        data.save_tokenizer(tokenizer, out)

    extra = {"command": "finetune", "base_model": str(args.model), "text": os.path.abspath(args.text),
             "lora_parameters": n_lora}
    state = run(model, train_ids, val_ids, opts, args.out, save_checkpoint, resume=args.resume, extra_state=extra,
                verified_state=verified)
    if args.merge_to:
        save_pretrained(args.merge_to, config, lora.merge_adapters(params, adapters))
        data.save_tokenizer(tokenizer, args.merge_to)
        print(f"merged model saved to {args.merge_to}")
    summary = {k: state.get(k) for k in ("step", "train_loss", "val_loss", "tokens_per_s")}
    if state.get("val_loss") is not None:
        summary["val_perplexity"] = math.exp(state["val_loss"])
    print(json.dumps(summary, indent=1))
    return 0
