"""`minimamba bench`: prefill and decode speed, peak memory, and how they compare.

    minimamba bench --shape 130m                        # random weights of that shape, no download
    minimamba bench --model state-spaces/mamba-130m-hf  # a checkpoint
    minimamba bench --shape 130m --vs transformers --roofline
    minimamba bench --shape 130m --prompt-len 16384 --new-tokens 0   # the long-prompt memory check

What is measured:
  prefill  model(prompt, use_cache=True, logits_to_keep=1): the prompt's cost as
           generation pays it (logits for the last position only); tokens/s = b * l / time.
  decode   --new-tokens steps of model(next_token, cache_params=cache), greedy;
           tokens/s = b * new_tokens / time.
  memory   the peak resident set size (VmHWM) during the prefill, reset just before it
           through /proc/self/clear_refs, so it is the prefill's own peak and not the
           process's lifetime maximum (resource.getrusage's ru_maxrss cannot be reset;
           tracemalloc misses BLAS and Numba buffers and slows NumPy down). Where
           /proc is missing, ru_maxrss is shown and labelled as the lifetime peak.
Each figure is the best of --repeat runs (the machine may be shared: the fastest
run is the one least disturbed). With --vs transformers the two libraries run
alternately on the same weights, so their ratio is fair even when absolute numbers
drift. transformers runs in a child process of its own, so nothing minimamba loads or
tunes reaches torch's threads.

threads  the bench calls minimamba.tune_threads() first, the one call a library user makes
         to get these figures (the `minimamba` command makes it too); --untuned measures
         what a program that does not call it gets.

--roofline measures this machine's limits and prints each figure as a fraction:
  decode:  (bytes of weights read per token / memory bandwidth) / time per token
  prefill: (2 x matmul parameters x tokens / matmul FLOP/s) / prefill time
Bandwidth is the best of a large-array sum (Numba, all threads, when available)
and a NumPy copy; FLOP/s is NumPy's float32 matmul of 2048 x 2048 matrices.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np

from .config import MambaConfig
from .helpfmt import DefaultsHelpFormatter

SHAPES = {  # the state-spaces/mamba-*-hf checkpoints: (hidden_size, num_hidden_layers)
    "tiny": (64, 2),
    "130m": (768, 24),
    "370m": (1024, 48),
    "790m": (1536, 48),
    "1.4b": (2048, 48),
    "2.8b": (2560, 64),
}


def shape_config(shape: str) -> MambaConfig:
    """The config of a named checkpoint shape (vocab 50280, n 16, k 4, expand 2)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    d, layers = SHAPES[shape]
    vocab = 1000 if shape == "tiny" else 50280
    return MambaConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, state_size=16,
                       conv_kernel=4, expand=2)


# ---------------------------------------------------------------- memory


def _rss_bytes(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _rss_bytes("VmHWM") is not None
    except OSError:
        return False


def peak_rss() -> tuple[int, str]:
    """(bytes, how it was measured)."""
    hwm = _rss_bytes("VmHWM")
    if hwm is not None:
        return hwm, "VmHWM"
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "ru_maxrss (lifetime peak)"


# ---------------------------------------------------------------- the machine's limits


def measure_bandwidth(nbytes=1 << 30, repeat=3) -> float:
    """Memory read bandwidth in bytes/s: the best of a parallel sum and a NumPy copy of `nbytes`."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    best = 0.0
    try:
        from .kernels.bandwidth import parallel_sum

        parallel_sum(a[:1024])
        for _ in range(repeat):
            t = time.perf_counter()
            parallel_sum(a)
            best = max(best, a.nbytes / (time.perf_counter() - t))
    except ImportError:
        pass
    b = np.empty_like(a)
    for _ in range(repeat):  # a copy reads and writes: count both
        t = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t))
    return best


def measure_flops(size=2048, repeat=3) -> float:
    """float32 matmul FLOP/s (NumPy's BLAS, all threads)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best


# ---------------------------------------------------------------- runners


class MinimambaRunner:
    name = "minimamba"

    def __init__(self, model):
        self.model = model

    def measure(self, ids, new_tokens):
        return time_runner(self, ids, new_tokens)

    def prefill(self, ids):
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.cache_params  # (b, V), cache

    def decode(self, cache, token, steps):
        logits = None
        for _ in range(steps):
            logits = self.model(token, cache_params=cache, use_cache=True).logits[:, -1]  # (b, V)
            token = logits.argmax(axis=-1)[:, None]  # (b, 1)
        return logits


class TransformersRunner:
    name = "transformers"

    def __init__(self, model):
        try:
            import torch
            import transformers
        except ImportError:
            raise ImportError("--vs transformers needs torch and transformers: "
                              "pip install torch transformers (from the repository: pip install -e '.[crosscheck]')") from None
        self.torch = torch
        cfg = model.config
        hf_config = transformers.MambaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, state_size=cfg.state_size,
            num_hidden_layers=cfg.num_hidden_layers, conv_kernel=cfg.conv_kernel, expand=cfg.expand,
            time_step_rank=cfg.time_step_rank, use_bias=cfg.use_bias, use_conv_bias=cfg.use_conv_bias,
            layer_norm_epsilon=cfg.layer_norm_epsilon, tie_word_embeddings=cfg.tie_word_embeddings)
        dtype = torch.float64 if model.dtype == np.float64 else torch.float32
        self.model = transformers.MambaForCausalLM(hf_config).to(dtype).eval()
        state = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in model.state_dict().items()}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if m != "lm_head.weight"]:
            raise RuntimeError(f"weights did not map onto transformers: missing {missing}, unexpected {unexpected}")

    def prefill(self, ids):
        with self.torch.no_grad():
            out = self.model(self.torch.from_numpy(ids), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].numpy(), out.cache

    def decode(self, cache, token, steps):
        token = self.torch.from_numpy(np.asarray(token))
        with self.torch.no_grad():
            for _ in range(steps):
                out = self.model(token, cache=cache, use_cache=True)
                logits = out.logits[:, -1]
                token = logits.argmax(dim=-1)[:, None]
        return logits.numpy()


class TransformersProcess:
    """TransformersRunner in a child process, driven through a pipe, one measurement at a time.

    The child rebuilds the same weights (the same checkpoint, or the same shape and
    seed) in a process of its own, so minimamba's thread tuning does not touch torch;
    its peak RSS is its own.
    """

    name = "transformers"

    def __init__(self, source, dtype):
        import subprocess

        self.proc = subprocess.Popen([sys.executable, "-m", "minimamba.bench", "--transformers-worker",
                                      source, str(np.dtype(dtype))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._receive()  # "ready", or the child's error

    def _receive(self):
        import pickle

        try:
            kind, value = pickle.load(self.proc.stdout)
        except EOFError:
            raise RuntimeError(f"the transformers worker exited (code {self.proc.wait()}); "
                               "its error is printed above") from None
        if kind == "error":
            raise RuntimeError(f"the transformers worker failed: {value}")
        return value

    def measure(self, ids, new_tokens):
        import pickle

        pickle.dump((ids, new_tokens), self.proc.stdin)
        self.proc.stdin.flush()
        return self._receive()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def _transformers_worker(source, dtype):
    """The child's side: `python -m minimamba.bench --transformers-worker SOURCE DTYPE`.

    SOURCE is a checkpoint folder / Hub id, or "shape:NAME" for random weights made
    as run_bench makes them. Reads (ids, new_tokens) pickles on stdin and answers
    each with time_runner's tuple; results go to the real stdout, prints to stderr.
    """
    import pickle

    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # nothing else may write into the pipe
    try:
        runner = TransformersRunner(_bench_model(source, dtype, impl="numpy"))  # the NumPy copy is dropped
    except Exception as exc:
        pickle.dump(("error", f"{type(exc).__name__}: {exc}"), out)
        out.flush()
        return 1
    pickle.dump(("ok", "ready"), out)
    out.flush()
    while True:
        try:
            ids, new_tokens = pickle.load(sys.stdin.buffer)
        except EOFError:
            return 0
        pickle.dump(("ok", time_runner(runner, ids, new_tokens)), out)
        out.flush()


def _bench_model(source, dtype, impl=None):
    """The model a bench runs: a checkpoint, or "shape:NAME" (random weights, seed 0)."""
    from .model import MambaForCausalLM, init_weights

    if source.startswith("shape:"):
        config = shape_config(source[len("shape:"):])
        model = MambaForCausalLM(config, dtype=dtype, impl=impl, init=False)
        model.load_state_dict(init_weights(config, seed=0))
        return model
    return MambaForCausalLM.from_pretrained(source, dtype=dtype, impl=impl)


def time_runner(runner, ids, new_tokens):
    """(prefill seconds, decode seconds, prefill peak RSS bytes or None, last prefill logits)."""
    can_reset = reset_peak_rss()
    t = time.perf_counter()
    logits, cache = runner.prefill(ids)
    t_prefill = time.perf_counter() - t
    peak = peak_rss()[0] if can_reset else None
    t_decode = 0.0
    if new_tokens:
        token = np.asarray(logits).argmax(axis=-1)[:, None]
        t = time.perf_counter()
        runner.decode(cache, token, new_tokens)
        t_decode = time.perf_counter() - t
    return t_prefill, t_decode, peak, np.asarray(logits)


# ---------------------------------------------------------------- the command


def run_bench(args):
    if (args.model is None) == (args.shape is None):
        raise ValueError("give exactly one of --model PATH or --shape NAME")
    if args.prompt_len < 1 or args.batch < 1 or args.new_tokens < 0 or args.repeat < 1:
        raise ValueError("--prompt-len, --batch and --repeat must be >= 1 and --new-tokens >= 0")
    from . import threads

    if not args.untuned:
        threads.tune_threads()
    if getattr(args, "quantization", None):  # float32 vs int8 / int4 side by side: minimamba.quant_bench
        from .quant_bench import run_quant_bench
        return run_quant_bench(args)
    rss0 = _rss_bytes("VmRSS")
    source = args.model if args.model is not None else f"shape:{args.shape}"
    model = _bench_model(source, args.dtype, args.impl)
    label = args.model if args.model is not None else f"random weights, {args.shape} shape"
    if args.prefill_chunk is not None:
        model.backbone.prefill_chunk_size = args.prefill_chunk or None
    cfg = model.config
    size = _sizes(model)
    n_cpus = os.cpu_count()

    print(f"model      {label}: {size.n_params / 1e6:.1f} M parameters, {size.weight_bytes / 1e6:.0f} MB "
          f"in {model.dtype}")
    print(f"           d {cfg.hidden_size}, layers {cfg.num_hidden_layers}, e {cfg.intermediate_size}, "
          f"n {cfg.state_size}, V {cfg.vocab_size}")
    print(f"run        batch {args.batch}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"impl {model.kernels.name}, prefill chunk {model.backbone.prefill_chunk_size}, "
          f"best of {args.repeat}, {n_cpus} CPUs")

    runners = [MinimambaRunner(model)]
    if args.vs == "transformers":
        runners.append(TransformersProcess(source, model.dtype))
    try:
        return _run(args, model, runners, size, rss0)
    finally:
        for runner in runners:
            if hasattr(runner, "close"):
                runner.close()


def _sizes(model):
    """Parameter counts and the bytes a decode step must read, for the memory and roofline lines."""
    from types import SimpleNamespace

    cfg = model.config
    itemsize = np.dtype(model.dtype).itemsize
    n_params = model.num_parameters()
    embed_params = cfg.vocab_size * cfg.hidden_size
    head_params = embed_params  # the lm_head reads a (V, d) matrix per position, tied or not
    body_params = n_params - embed_params - (0 if cfg.tie_word_embeddings else head_params)
    return SimpleNamespace(n_params=n_params, weight_bytes=n_params * itemsize, body_params=body_params,
                           head_params=head_params,
                           decode_bytes=(body_params + head_params) * itemsize)  # the embedding row is negligible


def _run(args, model, runners, size, rss0):
    cfg = model.config
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, cfg.vocab_size, size=(args.batch, args.prompt_len), dtype=np.int64)

    warm = ids[:, :min(args.prompt_len, 128)]  # load kernels (impl auto: as a prompt this long would) and warm
    for runner in runners:
        runner.measure(warm, min(args.new_tokens, 2))

    best = {r.name: [math.inf, math.inf, 0] for r in runners}
    logits = {}
    for _ in range(args.repeat):
        for runner in runners:  # alternate, so drift in the machine's load hits both
            t_prefill, t_decode, peak, logits[runner.name] = runner.measure(ids, args.new_tokens)
            b = best[runner.name]
            b[0], b[1] = min(b[0], t_prefill), min(b[1], t_decode) if args.new_tokens else 0.0
            b[2] = max(b[2], peak or 0)

    roof = None
    if args.roofline:
        roof = measure_bandwidth(), measure_flops()
        print(f"machine    memory bandwidth {roof[0] / 1e9:.1f} GB/s, float32 matmul {roof[1] / 1e9:.0f} GFLOP/s")

    n_tok_prefill = args.batch * args.prompt_len
    print()
    print(f"{'':14}{'prefill tok/s':>15}{'decode tok/s':>14}{'ms/token':>10}{'prefill peak RSS':>19}")
    for runner in runners:
        t_prefill, t_decode, peak = best[runner.name]
        decode_tps = args.batch * args.new_tokens / t_decode if args.new_tokens else float("nan")
        ms = 1e3 * t_decode / args.new_tokens if args.new_tokens else float("nan")
        peak_txt = f"{peak / 1e9:.2f} GB" if peak else "n/a"
        print(f"{runner.name:14}{n_tok_prefill / t_prefill:>15.1f}{decode_tps:>14.1f}{ms:>10.2f}{peak_txt:>19}")

    from . import threads

    print(f"\n{threads.note()}")
    if model.kernels.name == "auto":
        from .dispatch import loaded

        print(f"kernels    impl auto: {'NumPy or Numba per call (Numba loaded)' if loaded() else 'NumPy only (no call needed Numba)'}")
    mm = best["minimamba"]
    if mm[2]:
        print(f"\nmemory     prefill peak RSS {mm[2] / 1e9:.2f} GB = weights {size.weight_bytes / 1e9:.2f} GB "
              f"+ {(mm[2] - size.weight_bytes) / 1e9:.2f} GB (process RSS before loading {rss0 / 1e9:.2f} GB: "
              f"Python, NumPy, Numba){'; transformers: its own process' if len(runners) > 1 else ''}")
    if len(runners) > 1:
        hf = best["transformers"]
        diff = np.abs(logits["minimamba"] - logits["transformers"]).max()
        print(f"vs transformers  prefill {hf[0] / mm[0]:.2f}x", end="")
        if args.new_tokens:
            print(f", decode {hf[1] / mm[1]:.2f}x", end="")
        print(f" (time ratio, >1 = minimamba faster); last prefill logits max |diff| {diff:.2e}")
    if roof:
        bandwidth, flops = roof
        prefill_flop = 2 * (size.body_params * n_tok_prefill + size.head_params * args.batch)
        print(f"roofline   prefill {prefill_flop / flops / mm[0]:.0%} of matmul peak "
              f"(2 x {size.body_params / 1e6:.1f} M params x {n_tok_prefill} tokens + head)")
        if args.new_tokens:
            bound = size.decode_bytes / bandwidth  # seconds per step if only the weights had to be read
            print(f"roofline   decode  {bound / (mm[1] / args.new_tokens):.0%} of bandwidth limit "
                  f"({size.decode_bytes / 1e6:.0f} MB of weights per step / {bandwidth / 1e9:.1f} GB/s "
                  f"= {1e3 * bound:.2f} ms per step, batch {args.batch})")
    return 0


def add_bench_parser(sub):
    p = sub.add_parser("bench", help="prefill/decode speed and memory, optionally against transformers",
                       description=__doc__.split("\n\n")[0].replace("`", ""), formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", help="a checkpoint folder or Hub repo id (or --shape)")
    p.add_argument("--shape", help=f"random weights of a checkpoint shape: {', '.join(SHAPES)} (or --model)")
    p.add_argument("--prompt-len", type=int, default=512, help="tokens in the prompt (prefill)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded after the prefill")
    p.add_argument("--batch", type=int, default=1, help="rows per call")
    p.add_argument("--dtype", default="float32", help="float32 or float64")
    p.add_argument("--impl", default="auto", help="auto (NumPy or Numba per call), reference, numpy, numba")
    p.add_argument("--vs", choices=["transformers"], help="also time transformers' CPU path, alternating")
    p.add_argument("--roofline", action="store_true", help="measure bandwidth and FLOP/s; print fractions")
    p.add_argument("--untuned", action="store_true",
                   help="skip minimamba.tune_threads(): what a program that does not call it gets")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is shown")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="tokens per prefill chunk (default: the model's, 2048; 0: one pass)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    p.add_argument("--quantization", choices=["int8", "int4", "both"],
                   help="time float32 and quantized weights side by side (see minimamba.quant_bench)")
    p.add_argument("--block-size", default="32", help="with --quantization: block size(s), e.g. 32 or 32,128")
    p.add_argument("--eval-text", help="with --quantization: a text file for perplexity and KL from float32")
    p.set_defaults(func=run_bench)


if __name__ == "__main__":  # the transformers worker of TransformersProcess
    if len(sys.argv) == 4 and sys.argv[1] == "--transformers-worker":
        sys.exit(_transformers_worker(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m minimamba.bench --transformers-worker SOURCE DTYPE (use `minimamba bench`)")
