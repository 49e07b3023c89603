"""The backend swap, end to end, on a machine without a GPU.

A fake `cupy` (tests/fake_cupy.py: NumPy underneath, CuPy's rules at the host
boundary) stands in for CuPy, so backend="cupy" runs the very code path a GPU
would, and every host<->device copy is counted.
"""

import subprocess
import sys

import numpy as np
import pytest

import fake_cupy
from minimamba import MambaCache, MambaForCausalLM
from minimamba.backend import Backend


@pytest.fixture
def fake(monkeypatch):
    module = fake_cupy.make_module()
    monkeypatch.setitem(sys.modules, "cupy", module)
    fake_cupy.transfers.reset()
    return module


def test_to_cupy_puts_every_weight_on_the_device(fake, tiny_model):
    n_weights = len(tiny_model.state_dict())
    tiny_model.to("cupy", impl="numpy")
    assert all(isinstance(w, fake.ndarray) for w in tiny_model.state_dict().values())
    assert tiny_model.backbone.backend.name == "cupy"
    # one host->device copy per weight, nothing else
    assert fake.transfers.host_to_device == n_weights, fake.transfers.log
    assert fake.transfers.device_to_host == 0


def test_forward_moves_only_the_ids(fake, tiny_config, tiny_model, rng):
    reference = MambaForCausalLM(tiny_config, seed=0, impl="numpy")
    ids = rng.integers(0, tiny_config.vocab_size, (2, 7))
    expected = reference(ids).logits
    tiny_model.to("cupy", impl="numpy")
    fake.transfers.reset()
    logits = tiny_model(ids).logits
    assert isinstance(logits, fake.ndarray)
    assert fake.transfers.host_to_device == 1, fake.transfers.log  # the ids
    assert fake.transfers.device_to_host == 0, fake.transfers.log
    err = np.abs(logits.get() - expected).max()
    print(f"fake-cupy vs numpy logits: max abs err {err:.3e}")
    assert err == 0  # same arithmetic on the same NumPy memory


def test_masked_prefill_and_decode_steps_copy_nothing_else(fake, tiny_config, tiny_model, rng):
    reference = MambaForCausalLM(tiny_config, seed=0, impl="numpy")
    ids = rng.integers(0, tiny_config.vocab_size, (2, 6))
    mask = np.ones((2, 6), dtype=np.int64)
    mask[0, :2] = 0  # left padding
    steps = rng.integers(0, tiny_config.vocab_size, (3, 2, 1))

    ref_cache = MambaCache(tiny_config, 2)
    ref_logits = [reference(ids, attention_mask=mask, cache_params=ref_cache, use_cache=True).logits]
    ref_logits += [reference(s, cache_params=ref_cache, use_cache=True).logits for s in steps]

    tiny_model.to("cupy", impl="numpy")
    cache = MambaCache(tiny_config, 2, backend=tiny_model.backend)
    assert all(isinstance(s, fake.ndarray) for s in cache.ssm_states + cache.conv_states)
    fake.transfers.reset()
    logits = [tiny_model(ids, attention_mask=mask, cache_params=cache, use_cache=True).logits]
    assert (fake.transfers.host_to_device, fake.transfers.device_to_host) == (2, 0), fake.transfers.log  # ids, mask
    for s in steps:
        fake.transfers.reset()
        logits.append(tiny_model(s, cache_params=cache, use_cache=True).logits)
        assert (fake.transfers.host_to_device, fake.transfers.device_to_host) == (1, 0), fake.transfers.log
    err = max(np.abs(a.get() - b).max() for a, b in zip(logits, ref_logits))
    print(f"fake-cupy vs numpy, masked prefill + 3 decode steps: max abs err {err:.3e}")
    assert err == 0


def test_from_pretrained_on_the_cupy_backend(fake, tiny_checkpoint, tiny_model, rng):
    model = MambaForCausalLM.from_pretrained(tiny_checkpoint, backend="cupy", impl="numpy")
    assert all(isinstance(w, fake.ndarray) for w in model.state_dict().values())
    ids = rng.integers(0, model.config.vocab_size, (1, 5))
    ref = MambaForCausalLM.from_pretrained(tiny_checkpoint, impl="numpy")  # same kernels, so bit-equal
    err = np.abs(model(ids).logits.get() - ref(ids).logits).max()
    print(f"from_pretrained(backend='cupy') vs numpy model: max abs err {err:.3e}")
    assert err == 0
    back = model.to("numpy")
    assert all(type(w) is np.ndarray for w in back.state_dict().values())


def test_missing_cupy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(ImportError, match=r"pip install cupy-cuda12x .*pip install -e '\.\[gpu\]'"):
        Backend("cupy")


def test_missing_device_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy.make_module(devices=0))
    with pytest.raises(RuntimeError, match="no CUDA device"):
        Backend("cupy")


def test_cuda_impl_needs_the_cupy_backend(tiny_config):
    with pytest.raises(ValueError, match="backend='cupy'"):
        MambaForCausalLM(tiny_config, impl="cuda")


def test_import_minimamba_imports_neither_cupy_nor_numba_cuda():
    code = ("import sys, minimamba\n"
            "m = minimamba.MambaForCausalLM(minimamba.MambaConfig(vocab_size=11, hidden_size=8, "
            "num_hidden_layers=1, state_size=2), impl='numpy')\n"
            "m([[1, 2]])\n"
            "print(sorted(k for k in sys.modules if k == 'cupy' or k.startswith('numba.cuda')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
