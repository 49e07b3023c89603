"""`minimamba dump` and `minimamba compare`: record a pass to a file, compare two files name by name.

    minimamba dump --model state-spaces/mamba-130m-hf --prompt "Hello" --dtype float64 -o ref.safetensors
    minimamba dump --shape 130m --ids 1,2,3 --engine transformers -o hf.safetensors   # random weights
    minimamba compare ref.safetensors mine.safetensors [--rtol R --atol A] [--plot err.png]

compare exits 0 when every common tensor is within tolerance, 1 when one is not,
2 on a usage error (missing file, no common names, shape mismatch). The
tolerance is explained in minimamba.compare.
"""

from __future__ import annotations

import numpy as np

from .compare import RecordFileError, compare, error_envelope, save_record


def _ids(text):
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise ValueError("--ids is empty")
    return np.asarray(ids, dtype=np.int64)[None, :]


def _layers(text):
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def load_dump_model(args):
    """(MambaForCausalLM in float64 weights-as-stored, source string): a checkpoint or a random shape."""
    from .model import MambaForCausalLM, init_weights

    if args.shape:
        from .bench import shape_config

        config = shape_config(args.shape)
        model = MambaForCausalLM(config, dtype=args.dtype, impl=args.impl, init=False)
        return model.load_state_dict(init_weights(config, seed=args.seed)), f"shape:{args.shape}:seed{args.seed}"
    return MambaForCausalLM.from_pretrained(args.model, dtype=args.dtype, impl=args.impl), args.model


def cmd_dump(args):
    if (args.model is None) == (args.shape is None):
        raise ValueError("give exactly one of --model or --shape")
    if (args.prompt is None) == (args.ids is None):
        raise ValueError("give exactly one of --prompt or --ids")
    model, source = load_dump_model(args)
    if args.quantization:  # what int8 / int4 weights do to each activation: compare with a float dump
        from .quant import quantize

        if args.engine != "minimamba":
            raise ValueError("--quantization runs minimamba's own forward: use it with --engine minimamba")
        model, source = quantize(model, args.quantization, args.block_size), f"{source}:{args.quantization}-b{args.block_size}"
    if args.ids is not None:
        ids = _ids(args.ids)
    else:
        if args.shape:
            raise ValueError("--prompt needs a tokenizer: use --model, or --ids with --shape")
        from .pipeline import load

        ids = np.asarray(load(model)[1].encode(args.prompt), dtype=np.int64)[None, :]
    layers = None if args.layers is None else _layers(args.layers)
    names = args.names or "*"
    if args.engine == "transformers":
        from .crosscheck import capture_transformers, to_transformers

        _, record = capture_transformers(to_transformers(model, args.dtype), ids, names=names, layers=layers)
    else:
        record = model(ids, record=names, record_layers=layers).record
    if not record:
        raise ValueError(f"nothing recorded: no name matches --names {names!r} in --layers {args.layers}")
    meta = {"input_ids": ids.tolist(), "dtype": args.dtype, "model": source, "engine": args.engine}
    if not args.no_envelope:
        from .quant import dequantized  # a quantized model's envelope: float32 vs float64 of its dequantized weights

        quantized = getattr(model, "quantization_config", None)
        own_float64 = args.dtype == "float64" and args.engine == "minimamba" and args.impl is None and not quantized
        meta["envelope"] = error_envelope(dequantized(model) if quantized else model, ids, names, layers,
                                          float64_record=record if own_float64 else None)  # that run: not twice
    save_record(args.output, record, meta)
    print(f"wrote {len(record)} tensors ({sum(v.nbytes for v in record.values()) / 1e6:.1f} MB) of {args.engine} "
          f"{args.dtype} on {ids.shape[1]} tokens to {args.output}"
          f"{'' if args.no_envelope else ' (with the float32 error envelope)'}")
    return 0


def cmd_compare(args):
    try:
        result = compare(args.reference, args.mine, rtol=args.rtol, atol=args.atol, factor=args.factor)
    except RecordFileError as err:
        raise ValueError(str(err)) from None  # the CLI prints it and exits 2
    print(result.report())
    if args.plot:
        result.plot(args.plot)
        print(f"plot: {args.plot}")
    return 0 if result.ok else 1


def add_check_parsers(sub):
    from .compare import ENVELOPE_FACTOR

    p = sub.add_parser("dump", help="record every named intermediate of one forward pass to a safetensors file")
    p.add_argument("--model", default=None, help="a checkpoint folder or Hub repo id")
    p.add_argument("--shape", default=None, help="random weights of a checkpoint shape instead (e.g. 130m)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights for --shape")
    p.add_argument("--prompt", default=None, help="text, tokenized with the model's tokenizer")
    p.add_argument("--ids", default=None, help="token ids, comma-separated: 1,2,3")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--impl", default=None, help="reference | numpy | numba (default: auto)")
    p.add_argument("--engine", default="minimamba", choices=["minimamba", "transformers"],
                   help="who runs the pass: minimamba, or transformers with forward hooks (crosscheck extra)")
    p.add_argument("--layers", default=None, help="layers to record: 0,3,5-7 (default all)")
    p.add_argument("--names", default=None, help="fnmatch pattern of names to record, e.g. '*.scan'")
    p.add_argument("--no-envelope", action="store_true", help="skip the float32 error envelope (one pass less)")
    p.add_argument("--quantization", default=None, choices=["int8", "int4"],
                   help="quantize the weights first (minimamba.quant): compare with a float dump to see, tensor by "
                        "tensor, what quantization does to the activations")
    p.add_argument("--block-size", type=int, default=32, help="with --quantization: weights per scale (32 or 128)")
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser("compare", help="compare two record files tensor by tensor; name the first divergence")
    p.add_argument("reference", help="the record to trust (e.g. minimamba float64)")
    p.add_argument("mine", help="the record to check")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (replaces the envelope)")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance (replaces the envelope)")
    p.add_argument("--factor", type=float, default=ENVELOPE_FACTOR,
                   help=f"tolerance = factor x the float32 error envelope (default {ENVELOPE_FACTOR:g})")
    p.add_argument("--plot", default=None, help="draw error / tolerance per layer to this PNG")
    p.set_defaults(func=cmd_compare)
