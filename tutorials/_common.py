"""What every tutorial shares: where the figures go, `check` (a max error against a tolerance) and `save`.

It sits next to the tutorials, so each one still runs on its own: `python tutorials/01_selective_scan.py`
puts this folder first on sys.path, and a notebook made from a tutorial (`jupytext --to notebook`) lands in
this folder, which is the working directory of its kernel.

Figures go to tutorials/figures/, or to the folder named by MINIMAMBA_FIGURES_DIR (the tests point it at a
temporary folder). Outside Jupyter, matplotlib draws to files only (the Agg backend).
"""

import os
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # a script or the test suite: draw to files only
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

FIGURES = Path(os.environ.get("MINIMAMBA_FIGURES_DIR", Path(__file__).resolve().parent / "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
EPS64 = float(np.finfo(np.float64).eps)  # 2.2e-16
EPS32 = float(np.finfo(np.float32).eps)  # 1.2e-07


def check(name, got, want, rtol):
    """Print the max abs / rel error of `got` against `want`; fail if rel > rtol (relative to max |want|).

    Returns the relative error, so a tutorial can draw or compare it.
    """
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err = float(np.max(np.abs(got - want)))
    rel = err / max(float(np.max(np.abs(want))), 1e-300)
    print(f"{name:<50} max abs err {err:.1e}   rel {rel:.1e}   (tol {rtol:.0e})")
    assert rel <= rtol, f"{name}: relative error {rel:.2e} > {rtol:.0e}"
    return rel


def save(fig, name, dpi=110):
    """Write `fig` to FIGURES/name as a PNG (and close it outside Jupyter, where nobody will look at it)."""
    fig.savefig(FIGURES / name, dpi=dpi, bbox_inches="tight")
    print("saved", FIGURES / name)
    if "ipykernel" not in sys.modules:
        plt.close(fig)
