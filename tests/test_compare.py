"""`minimamba dump` / `minimamba compare` and minimamba.compare: planted errors are found and named first.

The tolerance under test is the float32 error envelope (minimamba.compare); a
planted error is 1e-2 of a tensor's scale, ~1e4 times its float32 error.
"""

import os
import re

import numpy as np
import pytest

from minimamba import BUILTIN_MODEL_DIR, MambaForCausalLM
from minimamba.cli import main
from minimamba.compare import RecordFileError, compare, error_envelope, forward_order, load_record, save_record

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


@pytest.fixture
def dumps(tmp_path, tiny_checkpoint):
    """A float64 reference (with its envelope) and a float32 record of the same input, by the CLI."""
    ref, mine = str(tmp_path / "ref.safetensors"), str(tmp_path / "mine.safetensors")
    common = ["dump", "--model", str(tiny_checkpoint), "--ids", "3,1,4,1,5,9,2,6"]
    assert main(common + ["-o", ref]) == 0
    assert main(common + ["--dtype", "float32", "--no-envelope", "-o", mine]) == 0
    return ref, mine


def test_dump_writes_the_record_and_its_metadata(dumps, tiny_model):
    record, meta = load_record(dumps[0])
    assert meta["input_ids"] == [[3, 1, 4, 1, 5, 9, 2, 6]] and meta["dtype"] == "float64"
    assert set(meta["envelope"]) == set(record) and record["lm_head"].dtype == np.float64
    assert forward_order(record) == list(tiny_model(np.array([[3, 1, 4, 1, 5, 9, 2, 6]]), record=True).record)
    assert max(meta["envelope"].values()) > 0


def test_float32_is_within_its_own_envelope(dumps, capsys):
    assert main(["compare", *dumps]) == 0
    out = capsys.readouterr().out
    assert "first divergence: none" in out and "BEYOND" not in out


def test_plot_draws_the_error_per_layer(dumps, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot draws with matplotlib (the tutorials extra)")
    assert main(["compare", *dumps, "--plot", str(tmp_path / "err.png")]) == 0
    assert os.path.getsize(tmp_path / "err.png") > 1000


@pytest.mark.parametrize("name", ["backbone.layers.1.mixer.dt_softplus", "backbone.layers.0.mixer.in_proj"])
def test_a_planted_error_is_found_and_named_first(dumps, tmp_path, capsys, name):
    record, meta = load_record(dumps[1])
    planted = record[name].copy()
    planted[0, 2, 1] += 1e-2 * np.abs(planted).max()
    bad = str(tmp_path / "bad.safetensors")
    save_record(bad, {**record, name: planted}, meta)
    assert main(["compare", dumps[0], bad]) == 1
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "BEYOND" in line]
    assert len(rows) == 1 and rows[0].startswith(name)
    assert re.search(rf"^first divergence: {re.escape(name)} \(max abs .* at \(0, 2, 1\)", out, flags=re.M)


def test_rtol_atol_replace_the_envelope(dumps, capsys):
    assert main(["compare", *dumps, "--rtol", "0", "--atol", "0"]) == 1  # float32 is not float64 to the bit
    assert "elementwise (--rtol/--atol)" in capsys.readouterr().out
    assert main(["compare", *dumps, "--rtol", "1e-3", "--atol", "1e-6"]) == 0


def test_usage_errors_exit_2_with_a_clear_message(dumps, tmp_path, capsys):
    ref, mine = dumps
    assert main(["compare", ref, str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors: no such file" in capsys.readouterr().err
    other = str(tmp_path / "other.safetensors")
    save_record(other, {"something.else": np.zeros(3)})
    assert main(["compare", ref, other]) == 2
    assert "no tensor name in common" in capsys.readouterr().err
    record, _ = load_record(mine)
    save_record(other, {"lm_head": record["lm_head"][:, :-1]})
    assert main(["compare", ref, other]) == 2
    assert re.search(r"lm_head has shape \(1, 7, 61\) in mine but \(1, 8, 61\) in the reference",
                     capsys.readouterr().err)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    assert main(["compare", ref, str(junk)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    with pytest.raises(RecordFileError, match="no tolerance"):
        compare(load_record(ref)[0], load_record(mine)[0])  # dicts carry no envelope


def test_dump_subsets_and_bad_arguments(tmp_path, tiny_checkpoint, capsys):
    out = str(tmp_path / "sub.safetensors")
    assert main(["dump", "--model", str(tiny_checkpoint), "--ids", "1,2,3", "--layers", "1", "--names", "*.scan",
                 "-o", out]) == 0
    assert list(load_record(out)[0]) == ["backbone.layers.1.mixer.scan"]
    assert main(["dump", "--model", str(tiny_checkpoint), "--ids", "1,x", "-o", out]) == 2
    assert "--ids must be comma-separated integers" in capsys.readouterr().err
    assert main(["dump", "--model", str(tiny_checkpoint), "--ids", "1", "--names", "nothing", "-o", out]) == 2
    assert "nothing recorded" in capsys.readouterr().err


def test_readme_worked_example_runs():
    """The README's "Checking your own implementation" example, run as written."""
    text = open(README).read()
    section = text[text.index("## Checking your own implementation"):]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # the example asserts its own outcome
    assert namespace["result"].first_divergence == "backbone.layers.0.mixer.scan"


def test_envelope_is_zero_only_where_both_runs_are_exact():
    model = MambaForCausalLM.from_pretrained(BUILTIN_MODEL_DIR)
    env = error_envelope(model, np.array([[5, 6, 7, 8]]))
    assert env["backbone.embeddings"] == 0.0  # a lookup of float32 weights: exact in both
    assert all(v > 0 for k, v in env.items() if k != "backbone.embeddings")
