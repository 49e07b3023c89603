"""minimamba against numbers transformers computed (tests/fixtures/make_fixtures.py): no torch needed.

Tolerances. The golden numbers are transformers' float32 forward. Two float32
implementations that sum in different orders differ by a few ulps per operation;
through 2-3 layers the measured gap is <= 1e-6 absolute on logits and hidden
states of size ~3 (float32 ulp at 3 is 2.4e-7). We allow 1e-5 absolute + 1e-5
relative: ten times what is measured, and still far below what a real bug moves
(a swapped axis, a missing bias or a wrong eps changes the logits by > 1e-3).
Our float64 path is held to the same bound: the gap is then transformers' own
float32 rounding.
"""

import os

import numpy as np
import pytest
from _compare import assert_close

from minimamba import MambaCache, MambaConfig, MambaForCausalLM

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CASES = ["odd", "bf16", "sharded", "untied", "state_spaces"]
ATOL = RTOL = 1e-5  # see the module docstring


def load_golden(case):
    with np.load(os.path.join(FIXTURES, case, "golden.npz")) as g:
        return dict(g)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES)
def test_logits_loss_hidden_states(case, dtype):
    golden = load_golden(case)
    model = MambaForCausalLM.from_pretrained(os.path.join(FIXTURES, case), dtype=dtype)
    ids = golden["input_ids"]
    out = model(ids, labels=ids, output_hidden_states=True)
    assert out.logits.dtype == np.dtype(dtype)
    assert_close(f"{case} {dtype} logits", out.logits, golden["logits"], ATOL, RTOL)
    assert_close(f"{case} {dtype} loss", out.loss, golden["loss"], ATOL, RTOL)
    n_hidden = sum(1 for k in golden if k.startswith("hidden_states_"))
    assert n_hidden == model.config.num_hidden_layers + 1
    assert len(out.hidden_states) == n_hidden
    for i in range(n_hidden):
        assert_close(f"{case} {dtype} hidden_states[{i}]", out.hidden_states[i], golden[f"hidden_states_{i}"],
                     ATOL, RTOL)


@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_through_the_cache(case):
    """A plain argmax loop: prefill the prompt, then one token at a time through MambaCache."""
    golden = load_golden(case)
    model = MambaForCausalLM.from_pretrained(os.path.join(FIXTURES, case))
    tokens = golden["greedy_input"]  # (1, p)
    want = golden["greedy_tokens"]  # (1, p + 8)
    cache = MambaCache(model.config, max_batch_size=1)
    out = model(tokens, cache_params=cache, use_cache=True)
    for _ in range(want.shape[1] - tokens.shape[1]):
        next_token = out.logits[:, -1].argmax(axis=-1)[:, None]  # (1, 1)
        tokens = np.concatenate([tokens, next_token], axis=1)
        out = model(next_token, cache_params=cache, use_cache=True)
    print(f"{case}: ours {tokens[0].tolist()}, transformers {want[0].tolist()} "
          f"(their smallest top-2 margin {float(golden['greedy_min_margin']):.4f})")
    np.testing.assert_array_equal(tokens, want)
    assert cache.seqlen_offset == want.shape[1]  # the loop also fed the last token


@pytest.mark.parametrize("case", [c for c in CASES if "padded_logits" in load_golden(c)])
def test_left_padding_matches_transformers(case):
    """Only where transformers' padding means "the row alone" (use_bias=False; see make_fixtures.py)."""
    golden = load_golden(case)
    model = MambaForCausalLM.from_pretrained(os.path.join(FIXTURES, case))
    mask = golden["padded_attention_mask"]
    out = model(golden["padded_input_ids"], attention_mask=mask)
    real = mask.astype(bool)  # the padded positions' logits mean nothing, in either library
    assert_close(f"{case} left-padded logits", out.logits[real], golden["padded_logits"][real], ATOL, RTOL)


def test_padding_golden_exists():
    """make_fixtures.py writes padded numbers for every use_bias=False case; guard against losing them."""
    with_padding = [c for c in CASES if "padded_logits" in load_golden(c)]
    assert set(with_padding) == {"bf16", "sharded", "untied", "state_spaces"}


def test_fixture_configs_are_what_they_claim():
    """The fixtures cover what the issue asks: odd sizes, biases, bf16 storage, shards, the original layout."""
    odd = MambaConfig.from_pretrained(os.path.join(FIXTURES, "odd"))
    assert (odd.hidden_size, odd.state_size, odd.conv_kernel, odd.time_step_rank, odd.vocab_size) == (24, 3, 2, 5, 61)
    assert odd.use_bias and not odd.use_conv_bias
    shards = [f for f in os.listdir(os.path.join(FIXTURES, "sharded")) if f.endswith(".safetensors")]
    assert len(shards) >= 2 and os.path.exists(os.path.join(FIXTURES, "sharded", "model.safetensors.index.json"))
    with open(os.path.join(FIXTURES, "bf16", "model.safetensors"), "rb") as f:
        assert b'"BF16"' in f.read(4096)
    assert not MambaConfig.from_pretrained(os.path.join(FIXTURES, "untied")).tie_word_embeddings
    total = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(FIXTURES) for f in files)
    assert total < 5e6, f"committed fixtures are {total / 1e6:.1f} MB; keep them under 5 MB"
