"""generate(): the cache loop, the logits processors, stopping, padding, seeds and streamers.

Expected values come from independent computations in this file: full forward
passes without a cache, and plain-Python versions of transformers' processors.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from text_fixtures import text_checkpoint, text_model  # noqa: F401 - fixtures

from minimamba import MambaForCausalLM, generate, left_pad
from minimamba.generation import (apply_repetition_penalty, min_p_filter, process_logits, sample,
                                  top_k_filter, top_p_filter)

PROMPTS = [[51, 48, 46, 38, 48, 27], [262, 285, 222], [3, 4, 5, 6, 7, 8, 9, 10]]


def last_logits(model, tokens):
    """The next-token logits of each row after `tokens` (b, l), from a full pass without a cache."""
    return np.asarray(model(tokens).logits[:, -1], dtype=np.float64)  # (b, V)


def min_margin(model, tokens, p):
    """Smallest top-1 minus top-2 logit over the generated positions: how safe an argmax comparison is."""
    logits = np.asarray(model(tokens).logits[:, p - 1:-1], dtype=np.float64)  # (b, t, V)
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return float((top2[..., 1] - top2[..., 0]).min())


# ---------------------------------------------------------------- greedy and the cache


def test_greedy_equals_argmax_of_full_forward(text_model):
    """Each greedy token is the argmax of a fresh full pass over everything before it."""
    ids = np.array([PROMPTS[0]])
    out = generate(text_model, ids, max_new_tokens=12, eos_token_id=[])
    assert out.shape == (1, 6 + 12) and out.dtype == np.int64
    assert np.array_equal(out[:, :6], ids)
    for s in range(12):
        expected = last_logits(text_model, out[:, :6 + s]).argmax(-1)
        assert out[0, 6 + s] == expected[0], f"step {s}"
    print("min greedy margin", min_margin(text_model, out, 6))


def test_model_generate_delegates(text_model):
    ids = np.array([PROMPTS[1]])
    assert np.array_equal(text_model.generate(ids, max_new_tokens=5, eos_token_id=[]),
                          generate(text_model, ids, max_new_tokens=5, eos_token_id=[]))


def test_max_new_tokens_zero_returns_prompt(text_model):
    ids = np.array([PROMPTS[0]])
    assert np.array_equal(generate(text_model, ids, max_new_tokens=0), ids)


def test_cache_grows_not(text_model, monkeypatch):
    """Decode feeds one token per call (constant work per token), after one prefill of the whole prompt."""
    lengths = []
    real_call = MambaForCausalLM.__call__

    def spy(self, input_ids=None, **kw):
        lengths.append(np.asarray(input_ids).shape[1])
        assert kw.get("cache_params") is not None and kw.get("logits_to_keep") == 1
        return real_call(self, input_ids, **kw)

    monkeypatch.setattr(MambaForCausalLM, "__call__", spy)
    generate(text_model, np.array([PROMPTS[0]]), max_new_tokens=7, eos_token_id=[])
    assert lengths == [6] + [1] * 6  # no decode pass after the last token


# ---------------------------------------------------------------- sampling


def test_same_seed_same_tokens(text_model):
    ids = np.array(PROMPTS[:1] * 2)
    kw = dict(max_new_tokens=20, do_sample=True, top_k=50, eos_token_id=[])
    a = generate(text_model, ids, seed=7, **kw)
    b = generate(text_model, ids, seed=7, **kw)
    c = generate(text_model, ids, seed=8, **kw)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)  # 2 x 20 draws from ~50 tokens: equal by chance with p ~ 1e-30
    g1, g2 = np.random.default_rng(3), np.random.default_rng(3)
    assert np.array_equal(generate(text_model, ids, seed=g1, **kw), generate(text_model, ids, seed=g2, **kw))


def test_top_k_1_and_temperature_0_are_greedy(text_model):
    ids = np.array([PROMPTS[0], PROMPTS[2][:6]])
    greedy = generate(text_model, ids, max_new_tokens=15, eos_token_id=[])
    for kw in (dict(top_k=1), dict(temperature=0.0), dict(temperature=0.0, top_p=0.5, min_p=0.2),
               dict(temperature=1e-6)):
        got = generate(text_model, ids, max_new_tokens=15, do_sample=True, seed=1, eos_token_id=[], **kw)
        assert np.array_equal(got, greedy), kw
    # temperature=1e-6 equals greedy only because no runner-up is within ~1e-4 of the top logit:
    # its probability is then below exp(-1e-4 / 1e-6) = exp(-100).
    assert min_margin(text_model, greedy, 6) > 1e-4


def reference_allowed(x, temperature, top_k, top_p, min_p, tol):
    """transformers' filters on one row, in plain Python (lists, math.exp), in transformers' order.

    tol > 0 gives a superset of the exact answer (ties and rounding resolved in favour
    of keeping), tol < 0 a subset; the implementation's set must lie between them.
    """
    # Shift by the row max before dividing, as apply_temperature does (same softmax; rounding of the
    # shift can create ties, which top_k keeps). T = 1 is no processor at all, as in transformers: no shift.
    m0 = max(x) if temperature != 1.0 else 0.0
    s = [(v - m0) / temperature for v in x]
    alive = set(range(len(s)))
    if top_k:
        kth = sorted(s, reverse=True)[min(top_k, len(s)) - 1]
        alive = {i for i in alive if s[i] >= kth}

    def probs(ids):
        m = max(s[i] for i in ids)
        z = {i: math.exp(s[i] - m) for i in ids}
        total = sum(z.values())
        return {i: v / total for i, v in z.items()}

    s_max = max(s[i] for i in alive)
    if top_p < 1.0:
        pr = probs(alive)
        if tol > 0:  # ties count as after: the least mass before a token
            before = {i: sum(v for j, v in pr.items() if v > pr[i]) for i in alive}
        else:  # ties count as before: the most
            before = {i: sum(v for j, v in pr.items() if v >= pr[i] and j != i) for i in alive}
        top = max(alive, key=lambda i: pr[i])
        alive = {i for i in alive if before[i] < top_p + tol} | ({top} if tol > 0 else set())
    if min_p is not None:  # p_i / p_max = exp(s_i - s_max); the most likely token always survives top-p
        alive = {i for i in alive if math.exp(s[i] - s_max) >= min_p * (1 - tol)}
    return alive


rows = hnp.arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 12)),
                  elements=st.floats(-6, 6, allow_nan=False, width=32))


@settings(deadline=None, max_examples=150)
@given(x=rows, temperature=st.sampled_from([0.3, 1.0, 2.5]), top_k=st.sampled_from([None, 0, 1, 2, 5]),
       top_p=st.sampled_from([1.0, 0.9, 0.5, 0.1, 1e-6]), min_p=st.sampled_from([None, 0.0, 0.05, 0.5, 1.0]),
       seed=st.integers(0, 2**32 - 1))
def test_filtered_tokens_never_appear(x, temperature, top_k, top_p, min_p, seed):
    """Over 300 draws per row, every sampled token is in the set transformers' filters allow."""
    scores = process_logits(x.copy(), None, True, temperature, top_k, top_p, min_p, 1.0)  # (b, V)
    kept = np.isfinite(scores)
    draws = 300
    rng = np.random.default_rng(seed)
    for r in range(x.shape[0]):
        loose = reference_allowed(x[r].tolist(), temperature, top_k, top_p, min_p, tol=1e-9)
        strict = reference_allowed(x[r].tolist(), temperature, top_k, top_p, min_p, tol=-1e-9)
        got = set(np.flatnonzero(kept[r]).tolist())
        assert strict <= got <= loose, (strict, got, loose)
        tokens = sample(np.repeat(scores[r:r + 1], draws, axis=0), rng)  # (draws,)
        assert set(tokens.tolist()) <= got


def test_processor_order():
    """transformers' order: temperature first, then top-k, then top-p on the renormalised survivors, then min-p."""
    x = np.array([[0.0, -0.5, -0.6, -3.0]])
    # min-p 0.5 after T = 0.3: p1/p0 = exp(-0.5/0.3) = 0.19 < 0.5, token 1 goes; before T it would stay (0.61)
    assert np.isfinite(process_logits(x, None, True, 0.3, None, 1.0, 0.5, 1.0)).tolist() == [[1, 0, 0, 0]]
    # T = 3 flattens: token 2's ratio exp(-0.2) = 0.82 > 0.7 now passes min-p, token 3's exp(-1) does not
    assert np.isfinite(process_logits(x, None, True, 3.0, None, 1.0, 0.7, 1.0)).tolist() == [[1, 1, 1, 0]]
    # top-k 2 then top-p 0.6: among the two survivors p0 = 1 / (1 + exp(-0.5)) = 0.62 >= 0.6 alone suffices;
    # over all four tokens p0 = 0.45 and top-p would keep two
    assert np.isfinite(process_logits(x, None, True, 1.0, 2, 0.6, None, 1.0)).tolist() == [[1, 0, 0, 0]]
    assert np.isfinite(process_logits(x, None, True, 1.0, None, 0.6, None, 1.0)).tolist() == [[1, 1, 0, 0]]
    # greedy: only the repetition penalty applies
    assert process_logits(x, np.array([[0, 1, 0, 0]], bool), False, 0.3, 1, 0.1, 0.9, 2.0).tolist() == \
        [[0.0, -1.0, -0.6, -3.0]]


def test_min_p_is_per_row():
    """Row 0 is sharply peaked, row 1 flat: the same min_p removes a lot in row 0 and nothing in row 1."""
    scores = np.array([[10.0, 0.0, 0.0, -1.0], [0.1, 0.0, 0.05, 0.02]])
    kept = np.isfinite(min_p_filter(scores, 0.5))
    assert kept.tolist() == [[True, False, False, False], [True, True, True, True]]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    scores = np.log(probs)
    assert np.isfinite(top_p_filter(scores, 0.5)).tolist() == [[True, False, False, False]]  # 0.5 >= 0.5
    assert np.isfinite(top_p_filter(scores, 0.51)).tolist() == [[True, True, False, False]]
    assert np.isfinite(top_p_filter(scores, 0.95)).tolist() == [[True, True, True, False]]
    assert np.isfinite(top_p_filter(scores, 1.0)).all()


def test_top_p_partial_sort_equals_full_sort():
    """top_p_filter sorts only the most likely `candidates` tokens (growing 8x while they hold < top_p);
    with few candidates every path is taken, and the kept set equals the full sort's."""
    rng = np.random.default_rng(5)
    for case in range(200):
        x = rng.normal(0, rng.choice([0.1, 1.0, 4.0]), size=(int(rng.integers(1, 4)), int(rng.integers(2, 300))))
        top_p = float(rng.choice([0.3, 0.9, 0.99]))
        full = np.isfinite(top_p_filter(x, top_p, candidates=10**9))
        for candidates in (1, 2, 7):
            assert np.array_equal(np.isfinite(top_p_filter(x, top_p, candidates=candidates)), full), case


def test_top_k_keeps_ties():
    assert np.isfinite(top_k_filter(np.array([[1.0, 3.0, 3.0, 2.0]]), 1)).tolist() == [[False, True, True, False]]


def test_sample_follows_the_distribution():
    """Empirical frequencies within 5 standard errors of softmax(scores)."""
    scores = np.log(np.array([[0.6, 0.3, 0.1, 1.0]]))
    scores[0, 3] = -np.inf  # filtered: can never be drawn
    n = 20000
    tokens = sample(np.repeat(scores, n, axis=0), np.random.default_rng(0))
    freq = np.bincount(tokens, minlength=4) / n
    p = np.array([0.6, 0.3, 0.1, 0.0])
    se = np.sqrt(p * (1 - p) / n)
    print("frequencies", freq, "max z", np.max(np.abs(freq - p)[:3] / se[:3]))
    assert freq[3] == 0 and np.all(np.abs(freq - p)[:3] < 5 * se[:3])


def test_sampled_tokens_allowed_by_full_forward(text_model):
    """End to end: each sampled token passes top-k / top-p / min-p on logits recomputed without the cache."""
    ids = np.array([PROMPTS[0], PROMPTS[2][:6]])
    for kw in (dict(top_k=3), dict(top_p=0.3), dict(min_p=0.5), dict(temperature=0.7, top_k=5, top_p=0.6)):
        out = generate(text_model, ids, max_new_tokens=10, do_sample=True, seed=0, eos_token_id=[], **kw)
        for s in range(10):
            x = last_logits(text_model, out[:, :6 + s])
            for r in range(2):
                allowed = reference_allowed(x[r].tolist(), kw.get("temperature", 1.0), kw.get("top_k"),
                                            kw.get("top_p", 1.0), kw.get("min_p"), tol=1e-6)
                assert out[r, 6 + s] in allowed, (kw, s, r)


# ---------------------------------------------------------------- repetition penalty


def test_repetition_penalty_rule():
    """Divide positive logits, multiply negative ones, once per token however often it occurred."""
    scores = np.array([[2.0, -2.0, 1.0, 0.0]])
    seen = np.array([[True, True, False, True]])
    assert apply_repetition_penalty(scores, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, 0.0]]
    assert apply_repetition_penalty(scores, seen, 0.5).tolist() == [[4.0, -1.0, 1.0, 0.0]]


@pytest.mark.parametrize("penalty", [0.2, 3.0])
def test_repetition_penalty_in_generate(text_model, penalty):
    """Greedy with a penalty: each token is the argmax of the full-forward logits with every token seen
    so far in the row (prompt and generated, not the padding) penalised once."""
    out = generate(text_model, [PROMPTS[0], PROMPTS[1]], max_new_tokens=10, repetition_penalty=penalty,
                   eos_token_id=[], pad_token_id=7)
    p = out.shape[1] - 10
    for r, prompt in enumerate(PROMPTS[:2]):
        row = list(prompt)
        for s in range(10):
            x = last_logits(text_model, np.array([row]))[0]
            for t in set(row):
                x[t] = x[t] * penalty if x[t] < 0 else x[t] / penalty
            assert out[r, p + s] == int(np.argmax(x)), (r, s)
            row.append(int(out[r, p + s]))
    if penalty < 1:  # rewarding repeats visibly changes this model's (non-repeating) greedy text
        plain = generate(text_model, [PROMPTS[0]], max_new_tokens=10, eos_token_id=[])
        assert not np.array_equal(plain[0, 6:], out[0, p:])


# ---------------------------------------------------------------- stopping, padding, batches


def test_eos_stops_and_pads_each_row(text_model):
    ids = np.array([PROMPTS[0], PROMPTS[2][:6]])
    free = generate(text_model, ids, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, 6 + 2])  # row 0's third new token
    assert eos not in free[1, 6:].tolist(), "pick another prompt: row 1 would stop too"
    out = generate(text_model, ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=1)
    stop = free[0, 6:].tolist().index(eos)
    assert np.array_equal(out[0, :6 + stop + 1], free[0, :6 + stop + 1])  # up to and with eos
    assert (out[0, 6 + stop + 1:] == 1).all()  # then padding
    assert np.array_equal(out[1], free[1])  # the other row goes on untouched
    # eos as a list; once every row has stopped, generation ends early
    out = generate(text_model, ids, max_new_tokens=12, eos_token_id=[eos, int(free[1, 6 + 1])], pad_token_id=1)
    assert out.shape[1] == 6 + max(stop, 1) + 1


def test_left_padded_batch_equals_each_prompt_alone(text_model):
    ragged = generate(text_model, PROMPTS, max_new_tokens=10, eos_token_id=[], pad_token_id=5)
    p = max(map(len, PROMPTS))
    ids, mask = left_pad(PROMPTS, pad_token_id=5)
    assert np.array_equal(ragged[:, :p], ids) and mask.sum(1).tolist() == [len(q) for q in PROMPTS]
    explicit = generate(text_model, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    assert np.array_equal(ragged, explicit)
    for r, prompt in enumerate(PROMPTS):
        alone = generate(text_model, np.array([prompt]), max_new_tokens=10, eos_token_id=[])
        assert np.array_equal(ragged[r, p:], alone[0, len(prompt):]), r


def test_streamer_gets_tokens_in_order(text_model):
    got = []
    out = generate(text_model, [PROMPTS[0], PROMPTS[1]], max_new_tokens=8, eos_token_id=[], streamer=got.append)
    assert np.array_equal(np.stack(got, axis=1), out[:, -8:])

    class Streamer:  # transformers' protocol: put(prompt), put(each step), end()
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(np.asarray(value).copy())

        def end(self):
            self.calls.append("end")

    s = Streamer()
    out = generate(text_model, np.array([PROMPTS[0]]), max_new_tokens=5, eos_token_id=[], streamer=s)
    assert np.array_equal(s.calls[0], out[:, :6]) and s.calls[-1] == "end"
    assert [int(c[0]) for c in s.calls[1:-1]] == out[0, 6:].tolist()


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kw, words", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_k=-2), "top_k"), (dict(min_p=2.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(seed=-3), "seed"), (dict(seed="x"), "seed"),
    (dict(eos_token_id="a"), "eos_token_id"), (dict(eos_token_id=0, pad_token_id=10**6), "pad_token_id"),
    (dict(do_sample="yes"), "do_sample"), (dict(streamer=3), "streamer"),
])
def test_bad_arguments_are_named(text_model, kw, words):
    with pytest.raises(ValueError, match=words):
        generate(text_model, np.array([PROMPTS[0]]), **kw)


def test_bad_prompts(text_model):
    with pytest.raises(ValueError, match="attention_mask"):
        generate(text_model, PROMPTS, attention_mask=np.ones((3, 8)))
    with pytest.raises(ValueError, match="out of range"):
        generate(text_model, np.array([[1, 10**6]]))
    with pytest.raises(ValueError, match="right padding"):
        generate(text_model, np.array([[1, 2, 3]]), attention_mask=np.array([[1, 1, 0]]))
    with pytest.raises(ValueError, match="empty"):
        generate(text_model, [[1, 2], []])


def test_float_or_bad_mask_prompts_are_refused(text_model):
    with pytest.raises(ValueError, match="integers"):
        generate(text_model, np.array([[1.5, 2.0]]))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        generate(text_model, np.array([[1, 2, 3]]), attention_mask=np.ones((1, 2)))
    with pytest.raises(ValueError, match="only 0"):
        generate(text_model, np.array([[1, 2, 3]]), attention_mask=np.array([[0, 2, 1]]))
