"""The soak benchmark's measurements, short: decoding through one cache keeps resident memory flat."""

import sys

import pytest

from minimamba.soak import main, soak_decode, soak_prefill


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_decode_memory_stays_flat(tiny_model):
    rows = soak_decode(tiny_model, 1500, window=300)
    growth = rows[-1][3] - rows[0][3]
    print(f"RSS {rows[0][3]:.1f} -> {rows[-1][3]:.1f} MB over 1200 tokens; tok/s per window "
          f"{[round(r[1]) for r in rows]}")
    assert len(rows) == 5 and all(r[1] > 0 for r in rows)
    assert growth < 2.0  # MB; a cache or list growing per token would add far more over 1200 tokens


def test_prefill_one_call_and_chunk_by_chunk_agree(tiny_model):
    result = soak_prefill(tiny_model, 700, chunk=128)
    (_, _, a), (_, _, b) = result.values()
    assert abs(a - b).max() < 1e-4  # float32 rounding of chunked vs one-pass prefill


def test_the_command_runs(capsys):
    assert main(["--decode", "100", "--window", "50", "--prefill", "300"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "RSS" in out and "prefill 300 tokens" in out
