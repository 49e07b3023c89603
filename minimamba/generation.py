"""Text generation: prefill the prompt once, then one token at a time through the cache.

A Mamba model carries a fixed-size state (`MambaCache`: per layer a conv state
(b, e, k) and an SSM state (b, e, n)), so each new token costs the same time and
memory whatever the length of the context (the recurrence of Algorithm 2 with l = 1).

    ids = generate(model, input_ids, max_new_tokens=20)                  # greedy
    ids = generate(model, input_ids, do_sample=True, top_p=0.9, seed=0)  # sampling

The options have transformers' names and meanings, and the logits pass through
the same processors in the same order as in transformers' `GenerationMixin`
(`_get_logits_processor`):

    repetition_penalty                  (greedy and sampling)
    temperature -> top_k -> top_p -> min_p   (sampling only, `do_sample=True`)

Glossary: b batch, p prompt length (after left padding), t new tokens, V vocab_size.
"""

from __future__ import annotations

import numbers

import numpy as np

from .cache import MambaCache
from .model import check_input_ids

# ---------------------------------------------------------------- the prompts


def left_pad(sequences, pad_token_id=0):
    """Prompts of different lengths -> `(input_ids, attention_mask)`, both (b, p) int64, padded on the left.

    Mamba reads left to right and carries a state, so padding goes before the
    prompt; the model zeroes the padded positions and a padded row gives the
    same numbers as its prompt run alone.
    """
    rows = [np.asarray(s) for s in sequences]
    if not rows:
        raise ValueError("no prompts given")
    for i, row in enumerate(rows):
        if row.ndim != 1 or row.size == 0:
            raise ValueError(f"prompt {i} must be a non-empty list of token ids, got shape {row.shape}")
        if not np.issubdtype(row.dtype, np.integer):
            raise ValueError(f"prompt {i} must hold integer token ids, got dtype {row.dtype}")
    p = max(row.size for row in rows)
    input_ids = np.full((len(rows), p), pad_token_id, dtype=np.int64)  # (b, p)
    attention_mask = np.zeros((len(rows), p), dtype=np.int64)  # (b, p)
    for i, row in enumerate(rows):
        input_ids[i, p - row.size:] = row
        attention_mask[i, p - row.size:] = 1
    return input_ids, attention_mask


def _is_ragged(input_ids):
    """A list of token lists whose lengths differ."""
    if not isinstance(input_ids, (list, tuple)) or not input_ids:
        return False
    if not all(isinstance(row, (list, tuple, np.ndarray)) for row in input_ids):
        return False
    return len({len(row) for row in input_ids}) > 1


# ---------------------------------------------------------------- the options


def _token_ids(value, name):
    """None, an int or a list of ints -> a list of ints."""
    if value is None:
        return []
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{name} must be an int or a list of ints, got {value!r}")
    return [int(v) for v in values]


def check_generation_args(model, max_new_tokens, do_sample, temperature, top_k, top_p, min_p,
                          repetition_penalty, eos_token_id, pad_token_id, seed, streamer):
    """Every option checked, with an error that names it; returns (eos ids, pad id)."""
    def number(name, value, ok, what):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or not ok(value):
            raise ValueError(f"{name} must be {what}, got {value!r}")

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(do_sample, (bool, np.bool_)):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    number("temperature", temperature, lambda v: v >= 0, "a number >= 0 (0 means greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0):
        raise ValueError(f"top_k must be None or an integer >= 0 (0 and None mean no top-k), got {top_k!r}")
    number("top_p", top_p, lambda v: 0 < v <= 1, "in (0, 1] (1 means no top-p)")
    if min_p is not None:
        number("min_p", min_p, lambda v: 0 <= v <= 1, "None or in [0, 1]")
    number("repetition_penalty", repetition_penalty, lambda v: v > 0, "a number > 0 (1 means no penalty)")
    if seed is not None and not isinstance(seed, np.random.Generator):
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be None, an integer >= 0 or a numpy Generator, got {seed!r}")
    if streamer is not None and not callable(streamer) and not hasattr(streamer, "put"):
        raise ValueError("streamer must be a callable or an object with put() and end() (transformers' streamers)")

    V = model.config.vocab_size
    eos = _token_ids(model.config.eos_token_id if eos_token_id is None else eos_token_id, "eos_token_id")
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id
    if pad_token_id is None:  # as transformers: pad with the first eos token
        pad_token_id = eos[0] if eos else 0
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral):
        raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
    if eos and not 0 <= pad_token_id < V:  # finished rows feed the pad token back to the model
        raise ValueError(f"pad_token_id {pad_token_id} is out of range [0, {V}) for this model's vocab_size")
    return eos, int(pad_token_id)


# ---------------------------------------------------------------- the logits processors


def apply_repetition_penalty(scores, seen, penalty):
    """CTRL's penalty (Keskar et al. 2019), as transformers' RepetitionPenaltyLogitsProcessor.

    Every token already in the row (prompt, padding excluded, and generated) is
    penalised once, however often it occurred: a positive logit is divided by the
    penalty, a negative one multiplied, so penalty > 1 always makes it less likely.

    scores (b, V) float64; seen (b, V) bool.
    """
    penalised = np.where(scores < 0, scores * penalty, scores / penalty)  # (b, V)
    return np.where(seen, penalised, scores)


def apply_temperature(scores, temperature):
    """scores / T. NOTE: we subtract each row's max first (softmax does not change), so a tiny T
    cannot overflow to inf - inf = nan; a filtered -inf stays -inf."""
    top = scores.max(axis=-1, keepdims=True)  # (b, 1)
    return (scores - top) / temperature


def top_k_filter(scores, top_k, min_tokens_to_keep=1):
    """Keep the k highest scores of each row (ties with the k-th kept too), as TopKLogitsWarper."""
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth = -np.partition(-scores, k - 1, axis=-1)[:, k - 1:k]  # (b, 1) the k-th largest
    return np.where(scores < kth, -np.inf, scores)


def softmax(scores):
    """Probabilities in float64; -inf scores get probability 0."""
    z = np.exp(scores - scores.max(axis=-1, keepdims=True))  # (b, V)
    return z / z.sum(axis=-1, keepdims=True)


def top_p_filter(scores, top_p, min_tokens_to_keep=1, candidates=1024):
    """Nucleus sampling (Holtzman et al. 2019), as TopPLogitsWarper: keep the smallest set of
    most likely tokens whose probabilities sum to >= top_p.

    In descending order, a token is kept when the mass of the tokens before it is
    still < top_p (transformers' "remove where the ascending cumsum <= 1 - top_p",
    read from the other end); the min_tokens_to_keep most likely always stay.
    Only the most likely `candidates` tokens are sorted (8x more while they hold less
    than top_p of the mass): the same answer as sorting all V, without a full sort of 50k.
    """
    b, V = scores.shape
    probs = softmax(scores)  # (b, V)
    m = min(V, max(candidates, min_tokens_to_keep))
    while True:  # the m most likely tokens, m growing until they hold top_p of every row's mass
        order = np.argpartition(-probs, m - 1, axis=-1)[:, :m] if m < V else np.broadcast_to(np.arange(V), (b, V))
        top = np.take_along_axis(probs, order, axis=-1)  # (b, m)
        if m == V or (top.sum(axis=-1) >= top_p).all():
            break
        m = min(V, 8 * m)
    by_prob = np.argsort(-top, axis=-1, kind="stable")  # (b, m) most likely first
    order, top = np.take_along_axis(order, by_prob, axis=-1), np.take_along_axis(top, by_prob, axis=-1)
    before = np.cumsum(top, axis=-1) - top  # (b, m) mass strictly before each token
    keep_sorted = before < top_p
    keep_sorted[:, :min_tokens_to_keep] = True
    keep = np.zeros((b, V), dtype=bool)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return np.where(keep, scores, -np.inf)


def min_p_filter(scores, min_p, min_tokens_to_keep=1):
    """Min-p sampling (Nguyen et al. 2024), as MinPLogitsWarper: keep tokens whose probability
    is >= min_p times the probability of the most likely token of the same row.

    NOTE: the threshold is per row (b, 1); mamba_ssm's version compares the wrong
    quantities and fails for b > 1.
    """
    probs = softmax(scores)  # (b, V)
    keep = probs >= min_p * probs.max(axis=-1, keepdims=True)  # (b, V)
    k = min(min_tokens_to_keep, scores.shape[-1])
    top = np.argpartition(-probs, k - 1, axis=-1)[:, :k]  # (b, k) the k most likely
    np.put_along_axis(keep, top, True, axis=-1)
    return np.where(keep, scores, -np.inf)


def process_logits(scores, seen, do_sample, temperature, top_k, top_p, min_p, repetition_penalty):
    """transformers' order: repetition penalty; then, when sampling, temperature, top_k, top_p, min_p."""
    if repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, seen, repetition_penalty)
    if not do_sample:
        return scores
    if temperature != 1.0:
        scores = apply_temperature(scores, temperature)
    if top_k:
        scores = top_k_filter(scores, top_k)
    if top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    if min_p is not None:
        scores = min_p_filter(scores, min_p)
    return scores


def sample(scores, rng):
    """One token per row from softmax(scores), by inverting the cumulative distribution.

    A filtered token (-inf, probability 0) adds nothing to the running sum, so the
    first index where the sum exceeds u ~ U[0, total) always has probability > 0.
    """
    cdf = np.cumsum(softmax(scores), axis=-1)  # (b, V)
    total = cdf[:, -1]  # (b,) 1 up to rounding
    u = np.minimum(rng.random(scores.shape[0]) * total, np.nextafter(total, 0))  # (b,)
    return np.argmax(cdf > u[:, None], axis=-1).astype(np.int64)  # (b,)


# ---------------------------------------------------------------- the loop


def generate(model, input_ids, max_new_tokens=20, do_sample=False, temperature=1.0, top_k=None, top_p=1.0,
             min_p=None, repetition_penalty=1.0, eos_token_id=None, pad_token_id=None, attention_mask=None,
             seed=None, streamer=None):
    """Continue each prompt by up to `max_new_tokens` tokens; returns (b, p + t) int64, prompt included.

    Args:
        input_ids: (b, p) or (p,) token ids, or a list of token lists of different
            lengths (left-padded here, see `left_pad`).
        do_sample: False picks the most likely token (greedy); True samples.
        temperature: divides the logits before sampling. `temperature=0` means greedy
            (the limit T -> 0 of sampling), also when do_sample=True.
        top_k, top_p, min_p: sampling filters, applied in this order; None / 0, 1.0 and None switch them off.
        repetition_penalty: > 1 discourages tokens already in the row (greedy too).
        eos_token_id: int or list; a row that makes one stops and is padded with
            `pad_token_id` while the others go on; generation ends when all rows have
            stopped. None takes the config's (as transformers); [] never stops early.
        pad_token_id: None takes the config's, else the first eos id.
        attention_mask: (b, p) 1 for tokens, 0 for left padding.
        seed: int or numpy Generator for sampling; the same seed gives the same tokens.
        streamer: a callable, called with each step's new tokens (b,) int64; or an object
            with put()/end() as transformers' streamers (put gets the prompt (b, p) first).

    With do_sample=False, temperature, top_k, top_p and min_p are checked but not used
    (transformers ignores them too, with a warning).
    """
    eos, pad_token_id = check_generation_args(model, max_new_tokens, do_sample, temperature, top_k, top_p, min_p,
                                              repetition_penalty, eos_token_id, pad_token_id, seed, streamer)
    if _is_ragged(input_ids):
        if attention_mask is not None:
            raise ValueError("prompts of different lengths are left-padded here; pass no attention_mask with them")
        input_ids, attention_mask = left_pad(input_ids, pad_token_id)
    ids = check_input_ids(input_ids, model.config.vocab_size)  # (b, p) int64, in range; a 1-D prompt is b = 1
    b, p = ids.shape
    mask = np.ones((b, p), dtype=bool)  # (b, p) which positions are tokens, not padding
    if attention_mask is not None:
        attention_mask = np.asarray(attention_mask.get() if hasattr(attention_mask, "get") else attention_mask)
        attention_mask = attention_mask[None, :] if attention_mask.ndim == 1 else attention_mask
        if attention_mask.shape != (b, p):
            raise ValueError(f"attention_mask has shape {attention_mask.shape} but input_ids has {(b, p)}")
        mask = attention_mask != 0

    greedy = not do_sample or temperature == 0
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    V = model.config.vocab_size
    seen = np.zeros((b, V), dtype=bool)  # (b, V) tokens in each row so far, for the repetition penalty
    if repetition_penalty != 1.0:
        rows, cols = np.nonzero(mask)
        seen[rows, ids[rows, cols]] = True
    new_tokens = []  # t arrays (b,)
    unfinished = np.ones(b, dtype=bool)  # (b,)
    put = streamer if streamer is None or not hasattr(streamer, "put") else streamer.put
    if hasattr(streamer, "put"):
        streamer.put(ids.copy())
    to_numpy = model.backend.to_numpy

    if max_new_tokens > 0:
        # Prefill: the whole prompt in one pass; the cache then holds each row's state.
        cache = MambaCache(model.config, b, dtype=model.dtype, backend=model.backend)
        out = model(ids, attention_mask=attention_mask, cache_params=cache, use_cache=True,
                    logits_to_keep=1)  # the model checks the mask (0/1, left padding only)
        for step in range(max_new_tokens):
            scores = np.asarray(to_numpy(out.logits[:, -1]), dtype=np.float64)  # (b, V)
            if np.isnan(scores).any():
                raise FloatingPointError(f"the model produced NaN logits at generation step {step}")
            scores = process_logits(scores, seen, not greedy, temperature, top_k, top_p, min_p, repetition_penalty)
            next_tokens = np.argmax(scores, axis=-1) if greedy else sample(scores, rng)  # (b,)
            next_tokens = np.where(unfinished, next_tokens, pad_token_id).astype(np.int64)  # finished rows pad
            new_tokens.append(next_tokens)
            seen[np.arange(b), next_tokens.clip(0, V - 1)] = True
            if put is not None:
                put(next_tokens.copy())
            unfinished &= ~np.isin(next_tokens, eos)
            if not unfinished.any() or len(new_tokens) == max_new_tokens:
                break
            # Decode: one token per row through the cache, constant time and memory. Finished rows
            # still ride along (their pad tokens keep the batch rectangular).
            out = model(next_tokens[:, None], cache_params=cache, use_cache=True, logits_to_keep=1)
    if hasattr(streamer, "end"):
        streamer.end()
    if not new_tokens:
        return ids
    return np.concatenate([ids, np.stack(new_tokens, axis=1)], axis=1)  # (b, p + t)
