"""The whole model with impl="cuda": logits, prefill through the cache and decode steps.

Under the simulator the backend is tests/fake_cupy.py (NumPy memory with CuPy's
rules, counting host<->device copies), so this is the same code path a GPU runs;
on a GPU it is CuPy itself. Reference: the same weights in float64 on NumPy.
Tolerance 2e-5 * (1 + max|logit|): float32 through 2 layers of a tiny model
(errors ~1e-6 seen), far below what a wrong index or a missing term gives.
"""

import sys

import numpy as np
import pytest

from gpu_helpers import SIMULATOR, assert_close
from minimamba import MambaCache, MambaForCausalLM

TOL = 2e-5


@pytest.fixture
def cupy_backend(monkeypatch, kc):
    """The `cupy` module the model will use: the counting fake under the simulator, CuPy on a GPU."""
    if SIMULATOR:
        import fake_cupy

        module = fake_cupy.make_module()
        monkeypatch.setitem(sys.modules, "cupy", module)
        return module
    return pytest.importorskip("cupy")


def host(array):
    return array.get() if hasattr(array, "get") else np.asarray(array)


def counts(cupy):
    t = getattr(cupy, "transfers", None)  # only the fake counts
    return None if t is None else (t.host_to_device, t.device_to_host)


def reset(cupy):
    if hasattr(cupy, "transfers"):
        cupy.transfers.reset()


@pytest.mark.parametrize("scan_version", ["v1", "chunked", "v3"])
def test_model_on_cuda_kernels(cupy_backend, kc, monkeypatch, tiny_config, rng, scan_version):
    if scan_version == "chunked":  # make the automatic choice take the long-prompt scan at these lengths
        monkeypatch.setattr(kc, "V1_MIN_ROWS", 1 << 40)
        monkeypatch.setattr(kc, "MIN_CHUNK", 2)
    if scan_version == "v3":  # the lab's version in the model's place (the model takes kc's functions when made)
        from minimamba.kernels.lab import scan

        monkeypatch.setattr(scan, "V3_MIN_CHUNK", 4)  # several chunks even at these lengths
        monkeypatch.setattr(kc, "selective_scan_fn", scan.scan_v3)
    reference = MambaForCausalLM(tiny_config, seed=0, dtype="float64", impl="reference")
    model = MambaForCausalLM(tiny_config, seed=0).to("cupy", impl="cuda")
    assert model.kernels.name == "cuda"
    ids = rng.integers(0, tiny_config.vocab_size, (2, 11))

    reset(cupy_backend)
    logits = model(ids).logits
    assert counts(cupy_backend) in (None, (1, 0)), cupy_backend.transfers.log  # the ids, nothing else
    assert_close(f"{scan_version}: logits vs float64 reference", host(logits), reference(ids).logits, TOL)

    # prefill in two chunks through the cache (conv update + scan from initial_state), then decode steps
    ref_cache, cache = MambaCache(tiny_config, 2, dtype="float64"), MambaCache(tiny_config, 2, backend=model.backend)
    steps = [ids[:, :9], ids[:, 9:10], ids[:, 10:11]]
    for i, chunk in enumerate([ids[:, :5], ids[:, 5:9]] + steps[1:]):
        ref_logits = reference(chunk, cache_params=ref_cache, use_cache=True).logits
        reset(cupy_backend)
        got = model(chunk, cache_params=cache, use_cache=True).logits
        assert counts(cupy_backend) in (None, (1, 0)), cupy_backend.transfers.log
        assert_close(f"{scan_version}: cached chunk {i} (length {chunk.shape[1]})", host(got), ref_logits, TOL)
    for layer in range(tiny_config.num_hidden_layers):
        assert_close(f"ssm state {layer}", host(cache.ssm_states[layer]), ref_cache.ssm_states[layer], TOL)
        assert_close(f"conv state {layer}", host(cache.conv_states[layer]), ref_cache.conv_states[layer], TOL)


def test_left_padding_on_cuda_kernels(cupy_backend, kc, tiny_config, rng):
    """A left-padded row gives the numbers of its prompt run alone."""
    model = MambaForCausalLM(tiny_config, seed=0).to("cupy", impl="cuda")
    ids = rng.integers(1, tiny_config.vocab_size, (2, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    batch = host(model(ids, attention_mask=mask).logits)
    alone = host(model(ids[1:, 3:]).logits)
    assert_close("left-padded row vs alone", batch[1, 3:], alone[0], TOL)


@pytest.mark.parametrize("linear_version", ["v1", "v2"])
def test_decode_logits_without_cublas_equals_the_model(cupy_backend, kc, monkeypatch, tiny_config, rng,
                                                       linear_version):
    """kernels.cuda_graph.decode_logits (the capturable decode step) against the model's own decode."""
    from minimamba.kernels.cuda_graph import decode_logits

    from minimamba.kernels.lab import linear

    monkeypatch.setattr(kc, "THREADS", 8)  # linear runs one block per output: small blocks, fast simulator
    monkeypatch.setattr(linear, "LINEAR_V2_LAYOUT", linear.LinearLayout(row_threads=2, col_threads=4,
                                                                       cols_per_thread=2, k_tile=8))
    # decode_logits looks kc.linear up at each call: the lab's version 2 takes its place as it would in a graph
    monkeypatch.setattr(kc, "linear", dict(v1=kc.linear, v2=linear.linear_v2)[linear_version])
    model = MambaForCausalLM(tiny_config, seed=0).to("cupy", impl="cuda")
    ids = rng.integers(0, tiny_config.vocab_size, (3, 6))
    caches = [MambaCache(tiny_config, 3, backend=model.backend) for _ in range(2)]
    for cache in caches:
        model(ids, cache_params=cache, use_cache=True)
    tokens = rng.integers(0, tiny_config.vocab_size, (1, 3))  # one step: the simulator runs ~400 blocks per step
    for step in tokens:
        expected = host(model(step[:, None], cache_params=caches[0], use_cache=True).logits)[:, -1]
        reset(cupy_backend)
        got = decode_logits(model, caches[1], model.backend.asarray(step))
        assert counts(cupy_backend) in (None, (1, 0)), cupy_backend.transfers.log  # the tokens
        assert_close("decode_logits vs model decode step", host(got), expected, TOL)
    for a, b in zip(caches[0].ssm_states + caches[0].conv_states, caches[1].ssm_states + caches[1].conv_states):
        assert_close("cache after the steps", host(b), host(a), TOL)
    assert caches[1].seqlen_offset == caches[0].seqlen_offset
