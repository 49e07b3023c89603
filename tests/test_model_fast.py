"""The model with the fast paths: impl="numba" against impl="reference", chunked prefill,
the cached A, running without numba, and the bench command.

Tolerance for float32 against the float64 reference: 1e-5 relative to the logits' scale
(float32 epsilon 1.2e-7, two layers of matmuls and a short scan: errors of 1e-7..1e-6
are what the readable float32 path shows too).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from minimamba import MambaCache, MambaForCausalLM


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = float(np.abs(got - want).max())
    scale = max(1.0, float(np.abs(want).max()))
    print(f"max abs err {err:.3e}, rel to scale {err / scale:.3e}")
    return err / scale


@pytest.fixture
def ids(tiny_config):
    return np.random.default_rng(7).integers(0, tiny_config.vocab_size, (3, 29))


@pytest.fixture
def reference64(tiny_config, tiny_model):
    model = MambaForCausalLM(tiny_config, dtype="float64", impl="reference", init=False)
    return model.load_state_dict(tiny_model.state_dict())


def test_numba_model_matches_reference(tiny_config, tiny_model, reference64, ids):
    pytest.importorskip("numba")
    fast = MambaForCausalLM(tiny_config, impl="numba", init=False).load_state_dict(tiny_model.state_dict())
    assert fast.kernels.name == "numba"
    want = reference64(ids).logits
    assert rel_err(fast(ids).logits, want) < 1e-5
    fast64 = MambaForCausalLM(tiny_config, dtype="float64", impl="numba", init=False)
    fast64.load_state_dict(tiny_model.state_dict())
    assert rel_err(fast64(ids).logits, want) < 1e-12  # same maths in float64: only rounding differs


@pytest.mark.parametrize("impl", ["numpy", "numba"])
def test_decode_through_cache_matches_one_pass(tiny_config, tiny_model, reference64, ids, impl):
    if impl == "numba":
        pytest.importorskip("numba")
    model = MambaForCausalLM(tiny_config, impl=impl, init=False).load_state_dict(tiny_model.state_dict())
    want = reference64(ids).logits  # (b, l, V)
    out = model(ids[:, :20], use_cache=True)
    worst = rel_err(out.logits, want[:, :20])
    for t in range(20, ids.shape[1]):
        step = model(ids[:, t:t + 1], cache_params=out.cache_params, use_cache=True)
        worst = max(worst, rel_err(step.logits[:, -1], want[:, t]))
    assert out.cache_params.seqlen_offset == ids.shape[1]
    assert worst < 1e-5


@pytest.mark.parametrize("impl", ["numpy", "numba"])
@pytest.mark.parametrize("chunk", [1, 5, 28])
def test_chunked_prefill_matches_one_pass(tiny_config, tiny_model, ids, impl, chunk):
    if impl == "numba":
        pytest.importorskip("numba")
    model = MambaForCausalLM(tiny_config, impl=impl, init=False).load_state_dict(tiny_model.state_dict())
    model.backbone.prefill_chunk_size = None
    whole = model(ids, use_cache=True, output_hidden_states=True)
    model.backbone.prefill_chunk_size = chunk
    chunked = model(ids, use_cache=True, output_hidden_states=True)
    assert rel_err(chunked.logits, whole.logits) < 1e-6
    assert len(chunked.hidden_states) == len(whole.hidden_states)
    for a, b in zip(chunked.hidden_states, whole.hidden_states):
        assert a.shape == b.shape and rel_err(a, b) < 1e-6
    assert chunked.cache_params.seqlen_offset == ids.shape[1]
    for a, b in zip(chunked.cache_params.ssm_states + chunked.cache_params.conv_states,
                    whole.cache_params.ssm_states + whole.cache_params.conv_states):
        assert rel_err(a, b) < 1e-6
    without_cache = model(ids)  # a scratch cache carries the chunks; none is returned
    assert without_cache.cache_params is None and rel_err(without_cache.logits, whole.logits) < 1e-6


def test_chunked_prefill_with_left_padding(tiny_config, tiny_model, ids):
    """Padding that spans several chunks: the padded row still equals the prompt run alone."""
    model = MambaForCausalLM(tiny_config, init=False).load_state_dict(tiny_model.state_dict())
    model.backbone.prefill_chunk_size = 4
    mask = np.ones(ids.shape, dtype=np.int64)
    mask[0, :11] = 0
    padded = model(ids, attention_mask=mask, logits_to_keep=1).logits
    alone = model(ids[:1, 11:], logits_to_keep=1).logits
    assert rel_err(padded[:1], alone) < 1e-5


def test_logits_to_keep_gives_the_last_positions(tiny_model, ids):
    full = tiny_model(ids).logits
    last = tiny_model(ids, logits_to_keep=1).logits
    assert last.shape == (ids.shape[0], 1, full.shape[-1])
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-6, atol=1e-6)


def test_A_follows_A_log(tiny_model, ids):
    """A = -exp(A_log) is kept beside A_log and refreshed whenever A_log is set."""
    mixer = tiny_model.backbone.layers[0].mixer
    np.testing.assert_array_equal(mixer.A, -np.exp(mixer.A_log))
    before = tiny_model(ids).logits
    state = tiny_model.state_dict()
    name = "backbone.layers.0.mixer.A_log"
    state[name] = state[name] + 0.5
    tiny_model.load_state_dict(state)
    np.testing.assert_array_equal(mixer.A, -np.exp(mixer.A_log))
    assert np.abs(tiny_model(ids).logits - before).max() > 1e-4  # the new A is the one used


NO_NUMBA = """
import sys
sys.modules["numba"] = None  # any `import numba` now raises ImportError
import numpy as np
import minimamba
from minimamba import MambaConfig, MambaForCausalLM
cfg = MambaConfig(vocab_size=61, hidden_size=24, state_size=3, num_hidden_layers=2, conv_kernel=2,
                  time_step_rank=5, expand=2)
model = MambaForCausalLM(cfg)
assert model.kernels.name == "numpy", model.kernels.name
logits = model(np.arange(7)[None] % 61).logits
assert logits.shape == (1, 7, 61) and np.isfinite(logits).all()
try:
    MambaForCausalLM(cfg, impl="numba")
except ImportError as err:
    print("impl=numba without numba:", err)
else:
    raise SystemExit("impl='numba' should fail without numba")
print("ok", float(np.abs(logits).max()))
"""


def test_works_without_numba():
    result = subprocess.run([sys.executable, "-c", NO_NUMBA], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_bench_runs_on_tiny_shape(capsys):
    """The bench command end to end on a tiny random model; figures printed, not asserted."""
    from minimamba.cli import main

    code = main(["bench", "--shape", "tiny", "--prompt-len", "24", "--new-tokens", "3", "--repeat", "1",
                 "--prefill-chunk", "16"])
    out = capsys.readouterr().out
    print(out)
    assert code == 0
    assert "prefill tok/s" in out and "minimamba" in out and "peak RSS" in out


def test_bench_roofline_probes():
    from minimamba.bench import measure_bandwidth, measure_flops

    assert measure_bandwidth(nbytes=1 << 22, repeat=1) > 0
    assert measure_flops(size=128, repeat=1) > 0


def test_bench_rejects_bad_arguments(capsys):
    from minimamba.cli import main

    assert main(["bench", "--shape", "huge"]) == 2
    assert "unknown shape 'huge'" in capsys.readouterr().err
    assert main(["bench", "--shape", "tiny", "--prompt-len", "0"]) == 2


def test_bench_transformers_worker_reports_its_error():
    """The child process's failure comes back as a RuntimeError naming it, not a hang or a pickle error."""
    from minimamba.bench import TransformersProcess

    with pytest.raises(RuntimeError, match="unknown shape 'huge'"):
        TransformersProcess("shape:huge", np.float32)


@pytest.mark.crosscheck
def test_bench_vs_transformers_on_tiny_shape(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from minimamba.cli import main

    code = main(["bench", "--shape", "tiny", "--prompt-len", "16", "--new-tokens", "2", "--repeat", "1",
                 "--vs", "transformers"])
    out = capsys.readouterr().out
    print(out)
    assert code == 0
    diff = float(out.split("max |diff|")[1].split()[0])
    assert diff < 1e-4  # same weights, float32 both: the last logits agree to float32 rounding


def test_cache_class_is_unchanged(tiny_config):
    cache = MambaCache(tiny_config, 2)
    assert cache.ssm_states[0].shape == (2, tiny_config.intermediate_size, tiny_config.state_size)
