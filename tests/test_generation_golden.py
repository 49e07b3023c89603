"""Greedy generation against transformers' golden tokens stored beside each fixture checkpoint.

`tests/fixtures/<case>/golden.npz` holds `greedy_input` (1, p) and `greedy_tokens` (1, p + t), made by
transformers' `generate(do_sample=False, eos_token_id=-1)` (tests/fixtures/make_fixtures.py); no torch here.
"""

import glob
import os

import numpy as np
import pytest

from minimamba import MambaForCausalLM, generate

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def golden_cases():
    cases = []
    for path in sorted(glob.glob(os.path.join(FIXTURES, "*", "golden.npz"))):
        with np.load(path) as data:
            if "greedy_input" in data and "greedy_tokens" in data:
                cases.append(os.path.basename(os.path.dirname(path)))
    return cases or [pytest.param(None, marks=pytest.mark.skip(
        reason=f"no golden.npz with greedy_input/greedy_tokens under {FIXTURES} (make_fixtures.py writes them)"))]


@pytest.mark.parametrize("case", golden_cases())
def test_greedy_matches_transformers_golden(case):
    folder = os.path.join(FIXTURES, case)
    golden = np.load(os.path.join(folder, "golden.npz"))
    prompt, expected = golden["greedy_input"], golden["greedy_tokens"]
    model = MambaForCausalLM.from_pretrained(folder)
    # eos_token_id=[]: transformers was run with eos_token_id=-1, a token that never occurs
    tokens = generate(model, prompt, max_new_tokens=expected.shape[1] - prompt.shape[1], eos_token_id=[])
    same = int((tokens == expected).all(axis=0).sum()) - prompt.shape[1]
    margin = float(golden["greedy_min_margin"]) if "greedy_min_margin" in golden else float("nan")
    print(f"{case}: {same}/{expected.shape[1] - prompt.shape[1]} greedy tokens equal "
          f"(transformers' smallest top-2 logit margin {margin:.2e})")
    np.testing.assert_array_equal(tokens, expected)
