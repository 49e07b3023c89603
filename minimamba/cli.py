"""The `minimamba` command: `minimamba info MODEL`, and the commands later modules add."""

from __future__ import annotations

import argparse
import os
import sys

from .bench import add_bench_parser
from .check_cli import add_check_parsers
from .generate_cli import add_generate_parser
from .training.finetune_cli import add_finetune_parser
from .training.train_cli import add_train_parser


def cmd_info(args):
    from .config import MambaConfig
    from .weights import load_state_dict, read_checkpoint, resolve_model_dir

    folder = resolve_model_dir(args.model)
    config = MambaConfig.from_pretrained(folder)
    raw = read_checkpoint(folder)
    state = load_state_dict(folder, config)
    n_params = sum(v.size for v in state.values())
    stored = sorted({str(v.dtype) for v in raw.values()})
    print(f"model        {args.model}")
    print(f"folder       {folder}")
    print(f"layers       {config.num_hidden_layers}")
    print(f"hidden_size  {config.hidden_size} (d)   intermediate_size {config.intermediate_size} (e)")
    print(f"state_size   {config.state_size} (n)   conv_kernel {config.conv_kernel} (k)   "
          f"time_step_rank {config.time_step_rank} (r)")
    print(f"vocab_size   {config.vocab_size}   tied head {config.tie_word_embeddings}")
    print(f"parameters   {n_params:,}")
    print(f"stored as    {', '.join(stored)} ({sum(v.nbytes for v in raw.values()) / 1e6:.1f} MB on load)")
    print(f"float32      {n_params * 4 / 1e6:.1f} MB in memory")
    return 0


def add_info_parser(sub):
    p = sub.add_parser("info", help="print a checkpoint's config, parameter count and size")
    p.add_argument("model", help="a checkpoint folder or a Hub repo id")
    p.set_defaults(func=cmd_info)


def build_parser():
    parser = argparse.ArgumentParser(prog="minimamba", description="Mamba language models in NumPy")
    sub = parser.add_subparsers(dest="command", required=True)
    # Each command lives beside the code it drives; its module adds its own subparser.
    add_info_parser(sub)
    add_generate_parser(sub)
    add_bench_parser(sub)
    add_train_parser(sub)
    add_finetune_parser(sub)
    add_check_parsers(sub)  # dump, compare
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as err:
        print(f"minimamba {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `minimamba info ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
