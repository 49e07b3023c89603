"""The record's transformers-named entries equal forward-hook outputs of transformers (live, random models).

Both sides compute in float64 (transformers inside `transformers_in_true_float64`, which
removes its float32 casts), so they do the same arithmetic and differ only in summation
order: ~1e-15 relative; we allow 1e-10 of each tensor's max |value|.
Prefill without a cache, prefill with one, and a decode step through the cache.
"""

import copy

import numpy as np
import pytest

pytestmark = pytest.mark.crosscheck
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _hf_models import random_hf_model, to_minimamba, transformers_in_true_float64  # noqa: E402

from minimamba import MambaCache  # noqa: E402
from minimamba.compare import compare  # noqa: E402
from minimamba.crosscheck import capture_transformers, hooked_names, to_transformers  # noqa: E402

CONFIGS = {
    "odd_bias": dict(vocab_size=61, hidden_size=24, state_size=3, num_hidden_layers=3, conv_kernel=2,
                     time_step_rank=5, use_bias=True, use_conv_bias=False),
    "conv4": dict(vocab_size=53, hidden_size=40, state_size=5, num_hidden_layers=2, conv_kernel=4, expand=3),
}
REL = 1e-10


def check_equal(label, hf_record, mine):
    assert hf_record, f"{label}: no hook fired"
    for name, want in hf_record.items():
        got = mine[name]
        assert got.shape == want.shape, f"{label} {name}: {got.shape} vs hook {want.shape}"
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)
        print(f"{label:8s} {name:40s} rel err {err:.1e}")
        assert err < REL, f"{label} {name}: {err:.2e}"


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    hf = random_hf_model(CONFIGS[request.param], seed=7)
    return hf, to_minimamba(hf, "float64")


def test_prefill_record_equals_transformers_hooks(pair):
    hf, mine = pair
    ids = np.random.default_rng(0).integers(0, mine.config.vocab_size, (2, 9))
    with transformers_in_true_float64():
        hf64 = copy.deepcopy(hf).double()
        _, hooks = capture_transformers(hf64, ids)
    record = mine(ids, record=True).record
    names_fired = set(hooks)
    assert names_fired <= set(hooked_names(mine.config.num_hidden_layers))
    assert {"backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.x_proj", "lm_head"} <= names_fired
    check_equal("prefill", hooks, record)


def test_decode_record_equals_transformers_hooks(pair):
    hf, mine = pair
    ids = np.random.default_rng(1).integers(0, mine.config.vocab_size, (2, 6))
    token = ids[:, -1:]
    cache = MambaCache(mine.config, 2, dtype="float64")
    with transformers_in_true_float64():
        hf64 = copy.deepcopy(hf).double()
        out, prefill_hooks = capture_transformers(hf64, ids[:, :-1], use_cache=True)
        _, decode_hooks = capture_transformers(hf64, token, cache=out.cache, use_cache=True)
    check_equal("prefill+", prefill_hooks, mine(ids[:, :-1], cache_params=cache, use_cache=True, record=True).record)
    check_equal("decode", decode_hooks, mine(token, cache_params=cache, use_cache=True, record=True).record)


def test_to_transformers_round_trip_and_compare(pair):
    """to_transformers builds the same model; compare() of its float32 hooks passes at float32's tolerance."""
    _, mine = pair
    ids = np.random.default_rng(2).integers(0, mine.config.vocab_size, (1, 8))
    _, hooks = capture_transformers(to_transformers(mine), ids)
    result = compare(mine(ids, record=True).record, hooks, rtol=1e-4, atol=1e-5)
    print(result.report())
    assert result.ok and len(result.rows) == len(hooks)
