"""assert_close: compare arrays, print the max abs/rel error, fail with the figures."""

import numpy as np


def errors(got, want):
    """(max abs error, max rel error) with rel = |got - want| / max(|want|, tiny)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    diff = np.abs(got - want)
    rel = diff / np.maximum(np.abs(want), np.finfo(np.float64).tiny)
    return float(diff.max(initial=0.0)), float(rel.max(initial=0.0))


def assert_close(name, got, want, atol, rtol=0.0):
    """|got - want| <= atol + rtol * |want| everywhere; prints the measured errors either way."""
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    max_abs, max_rel = errors(got, want)
    print(f"{name}: max abs err {max_abs:.3e}, max rel err {max_rel:.3e} (atol {atol:.0e}, rtol {rtol:.0e})")
    bad = np.abs(got.astype(np.float64) - want.astype(np.float64)) > atol + rtol * np.abs(want.astype(np.float64))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} values differ; max abs err {max_abs:.3e}, "
                             f"max rel err {max_rel:.3e}; first at {where}: got {got[where]!r}, want {want[where]!r}")
