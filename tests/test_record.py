"""record=: every named intermediate of a pass, and the rules around it (never stale, one kernel set, plug-ins).

Comparisons between two ways of computing the same numbers use float32 rounding
of a few operations (TOL, as in test_model.py); "changes no output" is exact.
"""

import importlib.util
import re

import numpy as np
import pytest
from _compare import assert_close

import minimamba.record as record_module
from minimamba import MambaCache, MambaForCausalLM, ops
from minimamba.impl import KERNEL_NAMES

TOL = 1e-5
NEEDS_NUMBA = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                 reason="impl='numba' needs numba (the fast extra)")
IMPLS = ["reference", "numpy", pytest.param("numba", marks=NEEDS_NUMBA)]


def table_names():
    """The names of the table in minimamba.record's docstring, for layer 0."""
    rows = re.findall(r"^\| (\S+)\s+\| \(", record_module.__doc__, flags=re.M)
    return [r.replace(".i.", ".0.").replace("layers.i", "layers.0") for r in rows]


@pytest.fixture
def ids(tiny_config):
    return np.random.default_rng(3).integers(0, tiny_config.vocab_size, (2, 7))


def test_record_holds_the_table_in_forward_order(tiny_model, ids):
    out = tiny_model(ids, record=True, use_cache=True)
    layer0 = [n for n in out.record if n.startswith("backbone.layers.0")]
    want = [n for n in table_names() if n.startswith("backbone.layers.0")]
    assert layer0 == want
    names = list(out.record)
    assert names[0] == "backbone.embeddings" and names[-2:] == ["backbone.norm_f", "lm_head"]
    assert names.index("backbone.layers.0") < names.index("backbone.layers.1.norm")
    cfg = tiny_model.config
    b, l, d, e, n, r, k = 2, 7, cfg.hidden_size, cfg.intermediate_size, cfg.state_size, cfg.time_step_rank, cfg.conv_kernel
    shapes = {"norm": (b, l, d), "mixer.in_proj": (b, l, 2 * e), "mixer.conv_act": (b, l, e),
              "mixer.x_proj": (b, l, r + 2 * n), "mixer.dt_proj": (b, l, e), "mixer.dt_softplus": (b, l, e),
              "mixer.B": (b, l, n), "mixer.C": (b, l, n), "mixer.scan": (b, l, e), "mixer.gated": (b, l, e),
              "mixer.out_proj": (b, l, d), "mixer.conv_state": (b, e, k), "mixer.ssm_state": (b, e, n)}
    for short, shape in shapes.items():
        assert out.record[f"backbone.layers.1.{short}"].shape == shape, short
    assert out.record["lm_head"].shape == (b, l, cfg.vocab_size)


def test_record_entries_are_what_they_say(tiny_model, ids):
    out = tiny_model(ids, record=True, use_cache=True)
    rec, cfg = out.record, tiny_model.config
    e, n, r = cfg.intermediate_size, cfg.state_size, cfg.time_step_rank
    sd = tiny_model.state_dict()
    for i in range(cfg.num_hidden_layers):
        p, m = f"backbone.layers.{i}", f"backbone.layers.{i}.mixer"
        block_in = rec["backbone.embeddings"] if i == 0 else rec[f"backbone.layers.{i - 1}"]
        assert_close("norm", rec[f"{p}.norm"], ops.rms_norm(block_in, sd[f"{p}.norm.weight"]), TOL, TOL)
        assert_close("in_proj", rec[f"{m}.in_proj"], rec[f"{p}.norm"] @ sd[f"{m}.in_proj.weight"].T, TOL, TOL)
        assert_close("x_proj", rec[f"{m}.x_proj"], rec[f"{m}.conv_act"] @ sd[f"{m}.x_proj.weight"].T, TOL, TOL)
        dt = rec[f"{m}.x_proj"][..., :r] @ sd[f"{m}.dt_proj.weight"].T + sd[f"{m}.dt_proj.bias"]
        assert_close("dt_proj", rec[f"{m}.dt_proj"], dt, TOL, TOL)
        assert_close("dt_softplus", rec[f"{m}.dt_softplus"], ops.softplus(dt), TOL, TOL)
        np.testing.assert_array_equal(rec[f"{m}.B"], rec[f"{m}.x_proj"][..., r:r + n])
        np.testing.assert_array_equal(rec[f"{m}.C"], rec[f"{m}.x_proj"][..., r + n:])
        gate = ops.silu(rec[f"{m}.in_proj"][..., e:])
        assert_close("gated", rec[f"{m}.gated"], rec[f"{m}.scan"] * gate, TOL, TOL)
        assert_close("out_proj", rec[f"{m}.out_proj"], rec[f"{m}.gated"] @ sd[f"{m}.out_proj.weight"].T, TOL, TOL)
        np.testing.assert_array_equal(rec[p], block_in + rec[f"{m}.out_proj"])
        np.testing.assert_array_equal(rec[f"{m}.ssm_state"], out.cache_params.ssm_states[i])
    np.testing.assert_array_equal(rec["lm_head"], out.logits)


@pytest.mark.parametrize("impl", IMPLS)
def test_recording_changes_no_output(tiny_model, ids, impl):
    """Prefill with and without a cache, then decode: bit for bit the same logits and states."""
    model = MambaForCausalLM(tiny_model.config, impl=impl)
    plain_cache, rec_cache = MambaCache(model.config, 2), MambaCache(model.config, 2)
    np.testing.assert_array_equal(model(ids, record=True).logits, model(ids).logits)
    a = model(ids, cache_params=plain_cache, use_cache=True).logits
    b = model(ids, cache_params=rec_cache, use_cache=True, record=True).logits
    np.testing.assert_array_equal(a, b)
    for _ in range(3):
        token = a[:, -1:].argmax(-1)
        a = model(token, cache_params=plain_cache, use_cache=True).logits
        b = model(token, cache_params=rec_cache, use_cache=True, record=True).logits
        np.testing.assert_array_equal(a, b)
    for s, t in zip(plain_cache.ssm_states + plain_cache.conv_states, rec_cache.ssm_states + rec_cache.conv_states):
        np.testing.assert_array_equal(s, t)


@pytest.mark.parametrize("impl", IMPLS)
def test_prefill_and_decode_records_join_to_the_one_pass_record(tiny_model, ids, impl):
    model = MambaForCausalLM(tiny_model.config, impl=impl)
    full = model(ids, record=True).record
    cache = MambaCache(model.config, 2)
    parts = [model(ids[:, :4], cache_params=cache, use_cache=True, record=True).record]
    for t in range(4, 7):
        parts.append(model(ids[:, t:t + 1], cache_params=cache, use_cache=True, record=True).record)
    for name, want in full.items():
        got = np.concatenate([p[name] for p in parts], axis=1)
        assert_close(f"{impl} {name}", got, want, TOL, TOL)
    assert "backbone.layers.0.mixer.ssm_state" in parts[-1] and "backbone.layers.0.mixer.ssm_state" not in full


def test_chunked_prefill_records_like_one_pass(tiny_model, ids):
    full = tiny_model(ids, record=True).record
    tiny_model.backbone.prefill_chunk_size = 3  # the chunks run through a scratch cache, so states are recorded
    chunked = tiny_model(ids, record=True).record
    assert [n for n in chunked if not n.endswith(("conv_state", "ssm_state"))] == list(full)
    for name in full:
        assert_close(name, chunked[name], full[name], TOL, TOL)


def test_record_a_subset(tiny_model, ids):
    assert list(tiny_model(ids, record="*.x_proj").record) == [f"backbone.layers.{i}.mixer.x_proj" for i in (0, 1)]
    sub = tiny_model(ids, record=True, record_layers=[1]).record
    assert not any(n.startswith("backbone.layers.0") for n in sub)
    assert "backbone.layers.1.mixer.scan" in sub and "lm_head" in sub and "backbone.embeddings" in sub
    only = tiny_model(ids, record=["*.scan", "lm_head"], record_layers=[0]).record
    assert list(only) == ["backbone.layers.0.mixer.scan", "lm_head"]
    assert tiny_model(ids).record is None and tiny_model.backbone(ids, record=True).record
    with pytest.raises(ValueError, match="record_layers"):
        tiny_model(ids, record_layers=[0])
    with pytest.raises(ValueError, match="record must be"):
        tiny_model(ids, record=3)


# ---------------------------------------------------------------- never stale


def test_in_place_edits_of_every_parameter_change_the_logits_as_a_reload_would(tiny_model, ids):
    rng = np.random.default_rng(5)
    before = tiny_model(ids).logits
    for name, array in tiny_model.state_dict().items():
        delta = (0.3 * rng.standard_normal(array.shape)).astype(array.dtype)
        array += delta  # in place, as an optimiser step on state_dict() arrays does
        edited = tiny_model(ids).logits
        reloaded = MambaForCausalLM(tiny_model.config, init=False).load_state_dict(
            {k: v.copy() for k, v in tiny_model.state_dict().items()})
        np.testing.assert_array_equal(edited, reloaded(ids).logits, err_msg=name)
        assert np.abs(edited - before).max() > 1e-6, f"editing {name} in place moved nothing"
        array -= delta


def test_to_keeps_the_implementation(tiny_model, ids):
    model = MambaForCausalLM(tiny_model.config, impl="reference")
    model.to(dtype="float64")
    assert model.kernels.name == "reference" and model.dtype == np.float64
    assert model.backbone.layers[1].mixer.kernels is model.kernels
    model.to(impl="numpy")
    assert model.kernels.name == "numpy"
    model.to(dtype="float32")
    assert model.kernels.name == "numpy"


def test_one_kernel_set_per_model(tiny_model):
    mixers = [layer.mixer for layer in tiny_model.backbone.layers]
    assert all(m.kernels is tiny_model.kernels for m in mixers) and tiny_model.backbone.kernels is tiny_model.kernels
    numpy_set = MambaForCausalLM(tiny_model.config, impl="numpy", init=False).kernels
    tiny_model.kernels = numpy_set
    assert all(m.kernels is numpy_set for m in mixers) and tiny_model.backbone.kernels is numpy_set


# ---------------------------------------------------------------- plugged-in kernels


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_a_plugged_in_kernel_is_the_one_called(tiny_model, ids, kernel):
    calls = []
    default = getattr(MambaForCausalLM(tiny_model.config, impl="numpy", init=False).kernels, kernel)

    def spy(*args, **kwargs):
        calls.append(kernel)
        return default(*args, **kwargs)

    model = MambaForCausalLM(tiny_model.config, impl={kernel: spy, "base": "numpy"})
    assert getattr(model.kernels, kernel) is spy and kernel in model.kernels.name
    reference = MambaForCausalLM(tiny_model.config, impl="numpy")
    cache = MambaCache(model.config, 2)
    got = [model(ids, cache_params=cache, use_cache=True).logits, model(ids[:, :1], cache_params=cache, use_cache=True).logits]
    ref_cache = MambaCache(model.config, 2)
    want = [reference(ids, cache_params=ref_cache, use_cache=True).logits,
            reference(ids[:, :1], cache_params=ref_cache, use_cache=True).logits]
    np.testing.assert_array_equal(np.concatenate(got, 1), np.concatenate(want, 1))
    np.testing.assert_array_equal(model(ids).logits, reference(ids).logits)  # no cache: causal_conv1d_fn
    assert calls, f"{kernel} was plugged in but never called"
    model.to(dtype="float64")
    assert getattr(model.kernels, kernel) is spy  # .to() keeps the plug-in


def test_a_wrong_kernel_changes_the_logits(tiny_model, ids):
    def bad_scan(u, delta, A, B, C, D=None, z=None, **kwargs):
        return ops.selective_scan_fn(u, delta, A, B, C, D=None if D is None else 2 * D, z=z, **kwargs)

    good = MambaForCausalLM(tiny_model.config)(ids).logits
    bad = MambaForCausalLM(tiny_model.config, impl={"selective_scan_fn": bad_scan})(ids).logits
    assert np.abs(bad - good).max() > 1e-3


def test_unknown_kernel_names_are_refused(tiny_config):
    with pytest.raises(ValueError, match=r"unknown kernel\(s\) \['selective_scan'\].*selective_scan_fn"):
        MambaForCausalLM(tiny_config, impl={"selective_scan": ops.selective_scan_fn})
    with pytest.raises(ValueError, match="must be a function"):
        MambaForCausalLM(tiny_config, impl={"rms_norm": 3})
    with pytest.raises(ValueError, match="unknown impl"):
        MambaForCausalLM(tiny_config, impl="fast")


# ---------------------------------------------------------------- the selectivity switch


def test_selective_off_makes_dt_B_C_constants(tiny_model, ids):
    model = MambaForCausalLM(tiny_model.config)
    on = model(ids, record="*.x_proj").record
    for layer in model.backbone.layers:
        layer.mixer.selective = False
    off = model(ids, record="*.x_proj").record
    for name, x_dbl in off.items():
        W = model.state_dict()[name + ".weight"]
        np.testing.assert_allclose(x_dbl, np.broadcast_to(W.sum(axis=1), x_dbl.shape), rtol=TOL, atol=TOL)
        assert np.abs(on[name] - x_dbl).max() > 1e-3


def test_the_readme_table_is_the_module_table():
    """The names are documented in one table, shown twice (module docstring and README): the two agree."""
    import os

    readme = open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md")).read()
    rows = lambda text: re.findall(r"^\| (\S+ +\| \(.*)$", text, flags=re.M)  # noqa: E731
    assert rows(readme) == rows(record_module.__doc__) and len(rows(readme)) == 17
