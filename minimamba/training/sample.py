"""A few lines of sampling, to look at a checkpoint while it trains (the full
`generate` with top-k/top-p and streaming lives in minimamba.generation).

    python -m minimamba.training.sample CHECKPOINT "ROMEO." --tokens 200 --temperature 0.8 --seed 0
"""

from __future__ import annotations

import argparse

import numpy as np


def sample_ids(model, prompt_ids, max_new_tokens, temperature=0.8, seed=0):
    """Prefill the prompt once, then one token at a time through the cache. temperature 0: greedy."""
    from ..cache import MambaCache

    rng = np.random.default_rng(seed)
    ids = np.asarray(prompt_ids, dtype=np.int64)[None, :]  # (1, l)
    cache = MambaCache(model.config, 1, dtype=model.dtype, backend=model.backend)
    logits = model(ids, cache_params=cache, use_cache=True).logits[0, -1]  # (V,)
    out = []
    for _ in range(max_new_tokens):
        logits = np.asarray(logits, dtype=np.float64)
        if temperature == 0:
            token = int(np.argmax(logits))
        else:
            p = np.exp((logits - logits.max()) / temperature)
            token = int(rng.choice(len(p), p=p / p.sum()))
        out.append(token)
        logits = model(np.array([[token]]), cache_params=cache, use_cache=True).logits[0, -1]
    return out


def main(argv=None):
    from ..model import MambaForCausalLM
    from .data import load_tokenizer

    p = argparse.ArgumentParser(description="sample text from a checkpoint")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    model = MambaForCausalLM.from_pretrained(args.model)
    prompt = tokenizer.encode(args.prompt).ids
    if not prompt:
        raise SystemExit("the prompt is empty")
    new = sample_ids(model, prompt, args.tokens, args.temperature, args.seed)
    print(tokenizer.decode(prompt + new))


if __name__ == "__main__":
    main()
