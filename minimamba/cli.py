"""The `minimamba` command: `minimamba info MODEL`, and the commands later modules add."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def cmd_info(args):
    from .config import MambaConfig
    from .weights import SAFETENSORS_DTYPES, checkpoint_headers, load_state_dict, resolve_model_dir

    if str(args.model).endswith(".gguf"):  # a llama.cpp file: minimamba.gguf reads it
        from .gguf import print_info
        return print_info(args.model)
    folder = resolve_model_dir(args.model)  # a folder, a Hub id or "builtin"
    config = MambaConfig.from_pretrained(folder)
    headers = [entry for _, entries, _ in checkpoint_headers(folder) for entry in entries]  # no tensor read
    state = load_state_dict(folder, config, allow_non_finite=True)  # the one read of the weights
    n_params = sum(v.size for v in state.values())
    stored = sorted({str(np.dtype(SAFETENSORS_DTYPES[e.dtype])) if e.dtype != "BF16" else "bfloat16 (read as float32, "
                     "exactly)" for e in headers})
    non_finite = {k: int(v.size - np.count_nonzero(np.isfinite(v))) for k, v in state.items()}
    non_finite = {k: n for k, n in non_finite.items() if n}
    print(f"model        {args.model}")
    print(f"folder       {folder}")
    print_config(config)
    print(f"parameters   {n_params:,}")
    print(f"stored as    {', '.join(stored)}; {sum(e.end - e.begin for e in headers) / 1e6:.1f} MB of tensors")
    print(f"float32      {n_params * 4 / 1e6:.1f} MB in memory")
    if non_finite:
        first = next(iter(non_finite))
        print(f"non-finite   {sum(non_finite.values()):,} NaN/inf values in {len(non_finite)} tensors, first {first}")
    return 0


def print_config(config):
    print(f"layers       {config.num_hidden_layers}")
    print(f"hidden_size  {config.hidden_size} (d)   intermediate_size {config.intermediate_size} (e)")
    print(f"state_size   {config.state_size} (n)   conv_kernel {config.conv_kernel} (k)   "
          f"time_step_rank {config.time_step_rank} (r)")
    print(f"vocab_size   {config.vocab_size}   tied head {config.tie_word_embeddings}")


def add_info_parser(sub):
    p = sub.add_parser("info", help="print a checkpoint's config, parameter count and size")
    p.add_argument("model", help="a checkpoint folder, a Hub repo id, or 'builtin'")
    p.set_defaults(func=cmd_info)


def build_parser():
    from .bench import add_bench_parser
    from .check_cli import add_check_parsers
    from .generate_cli import add_generate_parser
    from .training.finetune_cli import add_finetune_parser
    from .training.train_cli import add_train_parser

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
    try:
        parser = build_parser()  # imports the commands' modules
    except KeyboardInterrupt:  # Ctrl-C while Python loads them: no traceback
        print("\ninterrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    try:
        if args.command != "bench":  # the bench tunes unless --untuned
            from .threads import tune_threads

            tune_threads()  # the command's own process: the thread pools tuned for the prefill
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as err:
        print(f"minimamba {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `minimamba info ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
