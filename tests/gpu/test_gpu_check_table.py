"""The GPU check's table and its kernel choices, from made-up timings (no GPU needed).

The next session with a GPU promotes a lab version into kernels/cuda.py on what these lines say,
so the side-by-side verdicts are checked here in both directions, and with sections missing.
"""

import pytest


@pytest.fixture
def gpu_check(kc, monkeypatch):
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")  # gpu_check drops it on import; restored after the test
    from minimamba.kernels import gpu_check

    return gpu_check


def timings(scan_v3_faster, linear_v2_faster):
    slow, fast = (4e11, 4.7e-4), (2.2e12, 9.2e-5)  # (bytes/s, seconds)
    results = {
        "device": "made-up", "copy_bw": 4.0e12,
        "scan_1x8192_chunked": fast if not scan_v3_faster else slow,
        "scan_1x8192_v3": fast if scan_v3_faster else slow,
        "scan_1x8192_v3best": (2.5e12, 8.0e-5, (128, 1, 1, 16), 256) if scan_v3_faster else
                              (1.5e12, 1.2e-4, (128, 1, 1, 16), 256),
        "scan_16x8192_chunked": (5e11, 6.1e-3),
        "scan_16x8192_v3": (2.0e12, 1.5e-3) if scan_v3_faster else (4e11, 7e-3),
        "decode_b64_graph": 4656.0, "decode_b64_v2_graph": 20000.0 if linear_v2_faster else 3000.0,
        "decode_b1_graph": 705.0, "decode_b1_v2_graph": 600.0,
    }
    return results


def test_choices_name_the_winners(gpu_check):
    text = gpu_check.table(timings(scan_v3_faster=True, linear_v2_faster=True))
    print(text)
    assert "promote lab scan 3 (v3, its best layout) to the library's long-prompt scan" in text
    assert "best v3 2,500 GB/s with V3_LAYOUT (128, 1, 1, 16), chunk 256" in text
    assert "promote lab linear 2 (v2) to the library's linear for batches of 2 rows or more" in text  # v1 wins b=1
    assert "decode b=64 MET (20,000 tok/s)" in text and "decode b=1 MET (705 tok/s)" in text
    assert "scan 1x1536x8192 MET (62%, v3best)" in text  # 2.5 TB/s of the 4.0 TB/s measured copy

    text = gpu_check.table(timings(scan_v3_faster=False, linear_v2_faster=False))
    assert "keep scan 2 (chunked) as the library's long-prompt scan" in text
    assert "keep linear 1 (v1) as the library's linear" in text
    assert "decode b=64 MISSED (4,656 tok/s)" in text
    assert "scan 1x1536x8192 MET (55%, chunked)" in text

    mixed = timings(scan_v3_faster=True, linear_v2_faster=True)
    mixed["scan_16x8192_v3"] = (4e11, 7e-3)  # v3 wins at one row of channels, chunked at 16
    mixed["decode_b1_v2_graph"] = 800.0  # v2 also wins at batch 1
    mixed.update(prefill_8192=9000.0, torch_prefill_8192=10000.0)
    text = gpu_check.table(mixed)
    assert "mixed: promote v3 for the shapes it wins" in text
    assert "promote lab linear 2 (v2) to the library's linear for every batch" in text
    assert "prefill 8192 MISSED (0.9x transformers)" in text


def test_table_survives_missing_sections(gpu_check):
    text = gpu_check.table({})
    assert "targets" in text and "choices" in text and "promote" not in text and "keep" not in text
