"""The model's own contracts: the cache, chunks, padding, bad input, loss, dtypes and implementations.

These compare minimamba with itself (one pass against another way of computing
the same thing), so the tolerances are float32 rounding of a few operations
(1e-5 on logits of size ~3, with measured gaps near 1e-6) unless stated.
The comparison with transformers is in test_golden.py and test_crosscheck_model.py.
"""

import os

import numpy as np
import pytest
from _compare import assert_close

from minimamba import MambaCache, MambaForCausalLM, MambaModel

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TOL = 1e-5


@pytest.fixture(scope="module", params=["odd", "state_spaces"])
def model(request):
    """The odd fixture has use_bias=True, conv_bias off, conv width 2; state_spaces has width 4."""
    return MambaForCausalLM.from_pretrained(os.path.join(FIXTURES, request.param))


def random_ids(model, shape, seed=0):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, shape)


def test_prefill_then_single_tokens_equals_one_pass(model):
    ids = random_ids(model, (2, 11))
    full = model(ids).logits  # (2, 11, V)
    cache = MambaCache(model.config, max_batch_size=2)
    steps = [model(ids[:, :4], cache_params=cache, use_cache=True).logits]
    for t in range(4, 11):
        out = model(ids[:, t:t + 1], cache_params=cache, use_cache=True)
        assert out.cache_params is cache
        steps.append(out.logits)
    assert_close("prefill + decode", np.concatenate(steps, axis=1), full, TOL, TOL)
    assert cache.seqlen_offset == 11


@pytest.mark.parametrize("cuts", [(3, 7), (1, 2, 5, 6), (5,)])
def test_multi_token_chunks_equal_one_pass(model, cuts):
    """Unlike transformers (which restarts the SSM from zero), chunks carry both states."""
    ids = random_ids(model, (2, 10), seed=1)
    full = model(ids, output_hidden_states=True)
    cache = None
    outs, bounds = [], (0,) + cuts + (10,)
    for a, b in zip(bounds[:-1], bounds[1:]):
        out = model(ids[:, a:b], cache_params=cache, use_cache=True, output_hidden_states=True)
        cache = out.cache_params
        outs.append(out)
    assert_close(f"chunks {cuts}", np.concatenate([o.logits for o in outs], axis=1), full.logits, TOL, TOL)
    for i in range(len(full.hidden_states)):
        got = np.concatenate([o.hidden_states[i] for o in outs], axis=1)
        assert_close(f"chunks {cuts} hidden_states[{i}]", got, full.hidden_states[i], TOL, TOL)


def test_cache_state_is_the_last_inputs(model):
    """After a pass the conv state holds the last k pre-conv inputs; a reset cache is a fresh one."""
    ids = random_ids(model, (1, 6), seed=2)
    cache = model(ids, use_cache=True).cache_params
    assert cache.seqlen_offset == 6
    k = model.config.conv_kernel
    assert all(s.shape == (1, model.config.intermediate_size, k) for s in cache.conv_states)
    assert all(s.dtype == np.float32 for s in cache.ssm_states)
    assert any(np.abs(s).max() > 0 for s in cache.ssm_states)
    cache.reset()
    after_reset = model(ids[:, :3], cache_params=cache, use_cache=True).logits
    assert_close("reset cache", after_reset, model(ids[:, :3]).logits, TOL, TOL)


def test_left_padded_row_equals_the_row_alone(model):
    """Contract 8: with left padding, each row's real positions give the numbers of that row run alone.

    Tested against our own unpadded run (the odd fixture has use_bias=True, where
    transformers' padding differs; see tests/fixtures/make_fixtures.py).
    """
    a = random_ids(model, (1, 8), seed=3)
    b = random_ids(model, (1, 5), seed=4)
    padded = np.concatenate([a, np.concatenate([np.full((1, 3), 7), b], axis=1)])  # (2, 8), pad token 7
    mask = np.ones_like(padded)
    mask[1, :3] = 0
    out = model(padded, attention_mask=mask, use_cache=True)
    assert_close("row 0 (no padding)", out.logits[0], model(a).logits[0], TOL, TOL)
    assert_close("row 1 (3 pads)", out.logits[1, 3:], model(b).logits[0], TOL, TOL)
    # the cache carries on as if each row had been alone: decode two more tokens
    nxt = random_ids(model, (2, 2), seed=5)
    cache = out.cache_params
    steps = [model(nxt[:, t:t + 1], cache_params=cache, use_cache=True).logits for t in range(2)]
    alone = model(np.concatenate([b, nxt[1:]], axis=1)).logits[0, -2:]
    assert_close("row 1 decoded after padding", np.concatenate(steps, axis=1)[1], alone, TOL, TOL)


def test_all_ones_mask_changes_nothing(model):
    ids = random_ids(model, (2, 6), seed=6)
    np.testing.assert_array_equal(model(ids, attention_mask=np.ones_like(ids)).logits, model(ids).logits)


@pytest.mark.parametrize("ids, mask, words", [
    ([[1, 2, 3]], [[1, 1, 0]], "right padding"),
    ([[1, 2, 3]], [[1, 0, 1]], "right padding"),
    ([[1, 2, 3]], [[1, 1]], "attention_mask has shape (1, 2) but input_ids has (1, 3)"),
    ([[1, 2, 3]], [[1, 2, 1]], "only 0 (padding) and 1 (token)"),
    ([[1, 2, 3], [1, 2, 3]], [[1, 1, 1], [0, 0, 0]], "row 1 has no tokens at all"),
    ([[1, 61, 3]], None, "token id 61 at (row 0, position 1) is out of range [0, 61)"),
    ([[1, -1, 3]], None, "token id -1 at (row 0, position 1) is out of range"),
    ([[]], None, "input_ids is empty"),
    (np.zeros((0, 3), dtype=np.int64), None, "input_ids is empty"),
    ([[1.5, 2.0]], None, "input_ids must be integers"),
    (np.array([["a", "b"]], dtype=object), None, "input_ids must be integers"),
    (np.zeros((1, 2, 3), dtype=np.int64), None, "input_ids must have shape (batch, length)"),
])
def test_bad_input_is_named(ids, mask, words):
    model = MambaForCausalLM.from_pretrained(os.path.join(FIXTURES, "odd"))
    with pytest.raises(ValueError) as err:
        model(np.asarray(ids) if not isinstance(ids, np.ndarray) else ids,
              attention_mask=None if mask is None else np.asarray(mask))
    print(err.value)
    assert words in str(err.value)


def test_whole_float_ids_and_1d_ids_are_accepted(model):
    ids = random_ids(model, (1, 5), seed=7)
    want = model(ids).logits
    np.testing.assert_array_equal(model(ids.astype(np.float64)).logits, want)
    np.testing.assert_array_equal(model(ids[0]).logits, want)
    np.testing.assert_array_equal(model(ids.tolist()).logits, want)


def test_other_bad_calls(model):
    ids = random_ids(model, (2, 4))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids, inputs_embeds=np.zeros((2, 4, 24)))
    with pytest.raises(ValueError, match=r"inputs_embeds has shape \(2, 4, 5\), expected \(batch, length >= 1, 24\)"):
        model(inputs_embeds=np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="cache_params holds 1 rows but the input has 2"):
        model(ids, cache_params=MambaCache(model.config, 1), use_cache=True)
    cache = model(ids, use_cache=True).cache_params
    with pytest.raises(ValueError, match="padding in a continuation"):
        model(ids[:, :2], attention_mask=np.array([[0, 1], [1, 1]]), cache_params=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"labels has shape \(2, 3\) but the logits cover \(2, 4\)"):
        model(ids, labels=ids[:, :3])
    with pytest.raises(ValueError, match="label 99 is out of range"):
        model(ids, labels=np.full_like(ids, 99))
    with pytest.raises(ValueError, match="leave logits_to_keep at 0"):
        model(ids, labels=ids, logits_to_keep=1)
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        MambaForCausalLM(model.config, dtype="float8")
    with pytest.raises(ValueError, match="float16 and bfloat16 checkpoints load exactly"):
        MambaForCausalLM(model.config, dtype="bfloat16")
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        MambaForCausalLM(model.config, backend="jax")
    with pytest.raises(ValueError, match="unknown impl 'fast'"):
        MambaForCausalLM(model.config, impl="fast")


def test_inputs_embeds_equals_input_ids(model):
    ids = random_ids(model, (2, 5), seed=8)
    embeds = model.backbone.embeddings_weight[ids]  # (2, 5, d)
    out_ids = model(ids, output_hidden_states=True)
    out_emb = model(inputs_embeds=embeds, output_hidden_states=True)
    np.testing.assert_array_equal(out_emb.logits, out_ids.logits)
    assert len(out_emb.hidden_states) == len(out_ids.hidden_states)


def test_output_hidden_states_count_and_last(model):
    ids = random_ids(model, (2, 5), seed=9)
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, 5, model.config.hidden_size) for h in out.hidden_states)
    np.testing.assert_array_equal(out.hidden_states[-1], model.backbone(ids).last_hidden_state)  # norm_f's output
    assert model(ids).hidden_states is None
    assert model(ids).cache_params is None and model(ids).loss is None


def test_logits_to_keep(model):
    ids = random_ids(model, (2, 6), seed=10)
    # a smaller matmul may block its sums differently in BLAS: equal to float32 rounding, not bit for bit
    assert_close("logits_to_keep=1", model(ids, logits_to_keep=1).logits, model(ids).logits[:, -1:], 1e-6, 1e-6)
    assert_close("logits_to_keep=3", model(ids, logits_to_keep=3).logits, model(ids).logits[:, -3:], 1e-6, 1e-6)


def plain_loss(logits, labels):
    """Mean cross-entropy over the counted (label != -100) next-token pairs, in float64, one at a time."""
    total, count = 0.0, 0
    for i in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = labels[i, t + 1]
            if target == -100:
                continue
            row = logits[i, t].astype(np.float64)
            total += np.log(np.exp(row - row.max()).sum()) + row.max() - row[target]
            count += 1
    return total / count


def test_loss_with_ignored_labels(model):
    ids = random_ids(model, (2, 7), seed=11)
    labels = ids.copy()
    labels[0, 2:4] = -100
    labels[1, 0] = -100  # the first label is never a target anyway
    out = model(ids, labels=labels)
    want = plain_loss(out.logits, labels)
    assert_close("loss with -100", out.loss, want, 1e-6, 1e-6)
    assert abs(float(out.loss) - float(model(ids, labels=ids).loss)) > 1e-4  # the ignored tokens mattered
    assert np.isnan(float(model(ids, labels=np.full_like(ids, -100)).loss))  # nothing counted: 0/0, as torch


def test_float64_agrees_with_float32(model):
    """The float32 path is float32 rounding away from the float64 one: measured ~1e-6 on logits of size ~3."""
    folder = model.folder
    m64 = MambaForCausalLM.from_pretrained(folder, dtype="float64")
    ids = random_ids(model, (2, 9), seed=12)
    out64 = m64(ids, labels=ids)
    assert out64.logits.dtype == np.float64 and np.asarray(out64.loss).dtype == np.float64
    assert all(h.dtype == np.float64 for h in m64(ids, output_hidden_states=True).hidden_states)
    assert m64(ids, use_cache=True).cache_params.ssm_states[0].dtype == np.float64
    assert_close("float32 vs float64 logits", model(ids).logits, out64.logits, TOL, TOL)
    assert not np.array_equal(model(ids).logits.astype(np.float64), out64.logits)  # it really is another path


def test_impl_reference_equals_numpy(model):
    """The readable per-step loop and the vectorised scan give the same model outputs."""
    ref = MambaForCausalLM.from_pretrained(model.folder, impl="reference")
    vec = MambaForCausalLM.from_pretrained(model.folder, impl="numpy")
    assert ref.kernels.name == "reference" and vec.kernels.name == "numpy"
    ids = random_ids(model, (2, 9), seed=13)
    assert_close("impl reference vs numpy", ref(ids).logits, vec(ids).logits, 1e-6, 1e-6)


def test_to_float64_and_back(model):
    ids = random_ids(model, (1, 4), seed=14)
    m = MambaForCausalLM.from_pretrained(model.folder)
    want32 = m(ids).logits
    m.to(dtype="float64")
    assert m(ids).logits.dtype == np.float64
    m.to(dtype="float32")
    np.testing.assert_array_equal(m(ids).logits, want32)


def test_random_init_round_trips_through_save(tmp_path, tiny_model, tiny_checkpoint):
    loaded = MambaForCausalLM.from_pretrained(tiny_checkpoint)
    ids = np.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(loaded(ids).logits, tiny_model(ids).logits)
    assert loaded.num_parameters() == sum(v.size for v in loaded.state_dict().values())
    backbone = MambaModel(tiny_model.config)
    assert backbone.num_parameters() == loaded.num_parameters()  # tied: the head adds nothing
