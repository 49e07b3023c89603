"""One model, several threads: each with its own cache gets exactly its serial numbers; a shared cache raises."""

import threading

import numpy as np
import pytest

from minimamba import MambaCache


def decode(model, ids, steps):
    """Prefill `ids`, then feed back the argmax `steps` times through one cache; the tokens."""
    cache = MambaCache(model.config, ids.shape[0], dtype=model.dtype)
    logits = model(ids, cache_params=cache, use_cache=True).logits
    out = []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1)[:, None]  # (b, 1)
        out.append(token)
        logits = model(token, cache_params=cache, use_cache=True).logits
    return np.concatenate(out, axis=1), logits


def test_threads_with_their_own_caches_get_their_serial_results(tiny_model):
    prompts = [np.random.default_rng(i).integers(0, tiny_model.config.vocab_size, (2, 5)) for i in range(6)]
    serial = [decode(tiny_model, p, 12) for p in prompts]
    results, errors = [None] * len(prompts), []
    start = threading.Barrier(len(prompts))

    def work(i):
        try:
            start.wait()
            results[i] = decode(tiny_model, prompts[i], 12)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (want_tokens, want_logits), (tokens, logits) in zip(serial, results):
        np.testing.assert_array_equal(tokens, want_tokens)
        np.testing.assert_array_equal(logits, want_logits)  # same arithmetic, same order: bit-identical


def test_a_cache_used_by_two_calls_at_once_raises(tiny_model):
    ids = np.array([[1, 2, 3]])
    cache = MambaCache(tiny_model.config, 1)
    holding, release, seen = threading.Event(), threading.Event(), []

    def hold():  # stands for a call in progress on another thread
        with cache.in_use():
            holding.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    holding.wait(10)
    try:
        with pytest.raises(RuntimeError, match="already in use by another model call") as err:
            tiny_model(ids, cache_params=cache, use_cache=True)
        seen.append(str(err.value))
    finally:
        release.set()
        t.join()
    print(seen[0])
    assert cache.seqlen_offset == 0  # the refused call changed nothing
    tiny_model(ids, cache_params=cache, use_cache=True)  # free again afterwards
    assert cache.seqlen_offset == 3


def test_two_threads_racing_on_one_cache_get_an_error_not_wrong_numbers(tiny_model):
    """Without the guard both would interleave their updates; with it, every call either runs alone or raises."""
    cache = MambaCache(tiny_model.config, 1)
    ids = np.array([[1]])
    outcomes = {"ran": 0, "refused": 0}
    lock = threading.Lock()

    def work():
        for _ in range(200):
            try:
                tiny_model(ids, cache_params=cache, use_cache=True)
                key = "ran"
            except RuntimeError:
                key = "refused"
            with lock:
                outcomes[key] += 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(outcomes)
    assert outcomes["ran"] + outcomes["refused"] == 800
    assert cache.seqlen_offset == outcomes["ran"]  # every call that ran, ran whole
