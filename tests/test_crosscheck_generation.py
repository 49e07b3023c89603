"""Live cross-check against transformers: greedy tokens, stopping and padding, and the logits processors.

    python -m pytest -m crosscheck tests/test_crosscheck_generation.py -s
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from minimamba import MambaForCausalLM, generate  # noqa: E402
from minimamba.generation import process_logits  # noqa: E402

pytestmark = pytest.mark.crosscheck

CONFIGS = {
    "odd": dict(vocab_size=61, hidden_size=24, state_size=3, num_hidden_layers=2, conv_kernel=2, time_step_rank=5,
                expand=2),
    "bias": dict(vocab_size=97, hidden_size=32, state_size=4, num_hidden_layers=3, conv_kernel=4, expand=2,
                 use_bias=True, use_conv_bias=False),
    "untied": dict(vocab_size=80, hidden_size=16, state_size=5, num_hidden_layers=2, conv_kernel=3, expand=3,
                   tie_word_embeddings=False),
}


def hf_model(overrides, seed):
    """transformers' random initialisation plus noise on every tensor, so continuations vary."""
    torch.manual_seed(seed)
    config = transformers.MambaConfig(**overrides, layer_norm_epsilon=1e-5)
    model = transformers.MambaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    torch.set_num_threads(1)
    hf = hf_model(CONFIGS[request.param], seed=list(CONFIGS).index(request.param))
    folder = tmp_path_factory.mktemp("hf") / request.param
    hf.save_pretrained(folder)
    hf.generation_config.eos_token_id = None  # "never stop early" is eos_token_id=None there, [] here
    return request.param, hf, MambaForCausalLM.from_pretrained(folder)


def hf_generate(hf, ids, **kw):
    with torch.no_grad():
        return hf.generate(torch.as_tensor(ids), do_sample=False, **kw).numpy()


def margin(hf, tokens, p):
    """Smallest top-1 minus top-2 logit (transformers') at the generated positions."""
    with torch.no_grad():
        logits = hf(torch.as_tensor(tokens)).logits[:, p - 1:-1]
    top2 = logits.topk(2, dim=-1).values
    return float((top2[..., 0] - top2[..., 1]).min())


def prompts(V, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, V, size=n).tolist() for n in (7, 3, 5)]


def test_greedy_batch_1_equals_transformers(pair):
    name, hf, ours = pair
    total = 0
    for i, prompt in enumerate(prompts(ours.config.vocab_size, 1)):
        ids = np.array([prompt])
        theirs = hf_generate(hf, ids, max_new_tokens=24, pad_token_id=0)
        mine = generate(ours, ids, max_new_tokens=24, eos_token_id=[])
        m = margin(hf, theirs, len(prompt))
        same = int((mine == theirs).all(axis=0).sum()) - len(prompt)
        print(f"{name} prompt {i}: {same}/24 greedy tokens equal, min top-2 logit margin {m:.2e}")
        total += same
        # the logits agree to ~1e-6 (float32), so a margin above 1e-5 means a mismatch is a real bug
        assert m > 1e-5, "near-tie: pick another seed"
        np.testing.assert_array_equal(mine, theirs)
    assert total == 3 * 24


def test_left_padded_batch_equals_transformers_per_row(pair):
    """Our padded batch, each row against transformers on that row alone (unpadded)."""
    name, hf, ours = pair
    rows = prompts(ours.config.vocab_size, 2)
    batch = generate(ours, rows, max_new_tokens=16, eos_token_id=[], pad_token_id=0)
    p = max(map(len, rows))
    for r, prompt in enumerate(rows):
        theirs = hf_generate(hf, np.array([prompt]), max_new_tokens=16, pad_token_id=0)
        m = margin(hf, theirs, len(prompt))
        print(f"{name} row {r}: min top-2 logit margin {m:.2e}")
        assert m > 1e-5, "near-tie: pick another seed"
        np.testing.assert_array_equal(batch[r, p:], theirs[0, len(prompt):])


def test_eos_and_padding_equal_transformers(pair):
    """Same-length batch; a row that makes eos stops and pads while the other goes on, as in transformers."""
    name, hf, ours = pair
    rng = np.random.default_rng(3)
    ids = rng.integers(1, ours.config.vocab_size, size=(2, 6))
    free = hf_generate(hf, ids, max_new_tokens=14, pad_token_id=0)
    eos = int(free[0, 6 + 3])
    theirs = hf_generate(hf, ids, max_new_tokens=14, eos_token_id=eos, pad_token_id=ours.config.vocab_size - 1)
    mine = generate(ours, ids, max_new_tokens=14, eos_token_id=eos, pad_token_id=ours.config.vocab_size - 1)
    print(f"{name}: eos {eos}, shapes {mine.shape} {theirs.shape}")
    np.testing.assert_array_equal(mine, theirs)


@pytest.mark.parametrize("penalty", [0.5, 1.3])
def test_greedy_repetition_penalty_equals_transformers(pair, penalty):
    name, hf, ours = pair
    for prompt in prompts(ours.config.vocab_size, 4)[:2]:
        ids = np.array([prompt])
        theirs = hf_generate(hf, ids, max_new_tokens=16, pad_token_id=0,
                             repetition_penalty=penalty)
        mine = generate(ours, ids, max_new_tokens=16, eos_token_id=[], repetition_penalty=penalty)
        np.testing.assert_array_equal(mine, theirs)


def test_logits_processors_equal_transformers():
    """Our processors against transformers' own warpers (float64 on both sides), on random logits:
    the same tokens survive and the surviving scores agree."""
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    rng = np.random.default_rng(0)
    checked = 0
    for case in range(300):
        b, V = int(rng.integers(1, 4)), int(rng.integers(2, 40))
        scores = rng.normal(0, float(rng.choice([0.5, 2.0, 6.0])), size=(b, V))
        input_ids = rng.integers(0, V, size=(b, 5))
        temperature = float(rng.choice([0.5, 1.0, 1.7]))
        top_k = int(rng.choice([0, 1, 3, 10]))
        top_p = float(rng.choice([1.0, 0.95, 0.6, 0.2]))
        min_p = [None, 0.05, 0.3][case % 3]
        penalty = float(rng.choice([1.0, 1.4, 0.7]))
        procs = LogitsProcessorList()
        if penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(penalty))
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_k:
            procs.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
        if min_p is not None:
            procs.append(MinPLogitsWarper(min_p))
        theirs = procs(torch.as_tensor(input_ids), torch.as_tensor(scores.copy())).numpy()
        seen = np.zeros((b, V), dtype=bool)
        seen[np.arange(b)[:, None], input_ids] = True
        mine = process_logits(scores.copy(), seen, True, temperature, top_k, top_p, min_p, penalty)
        np.testing.assert_array_equal(np.isfinite(mine), np.isfinite(theirs), err_msg=f"case {case}")
        # softmax is shift-invariant and we subtract the row max before dividing by T: compare shifted
        keep = np.isfinite(theirs)
        shift = lambda s: s - np.where(keep, s, -np.inf).max(axis=-1, keepdims=True)  # noqa: E731
        np.testing.assert_allclose(np.where(keep, shift(mine), 0), np.where(keep, shift(theirs), 0),
                                   rtol=1e-12, atol=1e-12)
        checked += 1
    print(f"{checked} random cases: kept sets identical to transformers' processors")
