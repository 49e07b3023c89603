"""Every tutorial runs top to bottom in a fresh interpreter, so the tutorials cannot drift from the library.

Part of the default suite on purpose: a tutorial that no longer runs is a bug. Each one
asserts its own numbers (max errors with tolerances); here we only need it to exit 0,
write the figures its markdown embeds, use only the public API, and open as a notebook.
"""

import ast
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

TUTORIALS_DIR = Path(__file__).resolve().parent.parent / "tutorials"
TUTORIALS = sorted(TUTORIALS_DIR.glob("[0-9]*.py"))
FIGURE_LINK = re.compile(r"!\[[^\]]*\]\(figures/([^)\s]+\.png)\)")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# what a tutorial may import: the public API, NumPy, matplotlib and the standard library
ALLOWED_IMPORTS = {"minimamba", "minimamba.ops", "numpy", "matplotlib", "matplotlib.pyplot",
                   "os", "sys", "time", "math", "pathlib", "json", "struct", "tempfile",
                   "numba", "minimamba.kernels.cuda",  # tutorials 6, 7: the CUDA kernels under the simulator
                   "minimamba.training.backward", "tracemalloc", "importlib.util",  # tutorial 8: the backward
                   "minimamba.training.grad", "minimamba.training.optim",  # tutorial 9: training
                   "_common"}  # tutorials/_common.py: check(), save() and the figure folder, shared by all
BUILTIN_WEIGHTS = TUTORIALS_DIR.parent / "minimamba" / "builtin" / "model.safetensors"


def figure_links(path):
    return FIGURE_LINK.findall(path.read_text(encoding="utf-8"))


def test_there_are_tutorials():
    assert len(TUTORIALS) >= 6, f"found {[p.name for p in TUTORIALS]} in {TUTORIALS_DIR}"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(path, tmp_path):
    pytest.importorskip("matplotlib")
    if "BUILTIN_MODEL_DIR" in path.read_text(encoding="utf-8") and not BUILTIN_WEIGHTS.is_file():
        pytest.skip(f"{path.name} runs on the built-in model and {BUILTIN_WEIGHTS} is absent")
    if "NUMBA_ENABLE_CUDASIM" in path.read_text(encoding="utf-8"):
        pytest.importorskip("numba", reason=f"{path.name} runs CUDA kernels in Numba's simulator (the fast extra)")
    figures = tmp_path / "figures"
    env = dict(os.environ, MPLBACKEND="Agg", MINIMAMBA_FIGURES_DIR=str(figures), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    elapsed = time.perf_counter() - start
    print(f"{path.name}: exit {proc.returncode} in {elapsed:.1f} s\n{proc.stdout}")
    assert proc.returncode == 0, (f"{path.name} failed with exit code {proc.returncode}\n--- stderr ---\n"
                                  f"{proc.stderr[-6000:]}\n--- end of stdout ---\n{proc.stdout[-2000:]}")
    linked = figure_links(path)
    assert linked, f"{path.name} embeds no figure (expected ![...](figures/NAME.png) in its markdown)"
    for name in linked:
        png = figures / name
        assert png.is_file(), f"{path.name} embeds figures/{name} but did not write it (wrote {os.listdir(figures)})"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000, f"{png} is not a real PNG"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_committed_figures_exist(path):
    missing = [name for name in figure_links(path) if not (TUTORIALS_DIR / "figures" / name).is_file()]
    assert not missing, f"{path.name} embeds {missing}; run `python tutorials/make_figures.py` and commit them"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_uses_only_the_public_api(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported <= ALLOWED_IMPORTS, f"{path.name} imports {sorted(imported - ALLOWED_IMPORTS)}"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_opens_as_notebook(path):
    """What `jupytext --to notebook` does: a valid notebook of markdown and code cells, and back unchanged."""
    jupytext = pytest.importorskip("jupytext")
    nbformat = pytest.importorskip("nbformat")
    text = path.read_text(encoding="utf-8")
    notebook = jupytext.reads(text, fmt="py:percent")
    nbformat.validate(notebook)
    kinds = [cell.cell_type for cell in notebook.cells]
    assert kinds[0] == "markdown" and notebook.cells[0].source.startswith("# "), "start with a markdown title"
    assert kinds.count("markdown") >= 3 and kinds.count("code") >= 3, kinds
    # round trip: the .py is in canonical percent format (jupytext only adds its version lines)
    back = jupytext.writes(notebook, fmt="py:percent")
    strip = lambda s: [line for line in s.splitlines() if "_version:" not in line]  # noqa: E731
    assert strip(back) == strip(text), f"{path.name} changes when written back by jupytext"


def test_readme_lists_every_tutorial():
    readme = (TUTORIALS_DIR / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in TUTORIALS if f"({p.name})" not in readme]
    assert not missing, f"tutorials/README.md does not link {missing}"
