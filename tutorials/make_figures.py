"""Regenerate the committed figures: run every tutorial, writing its PNGs into tutorials/figures/.

    python tutorials/make_figures.py            # all tutorials
    python tutorials/make_figures.py 01 04      # the tutorials whose names start with these

Each tutorial runs in a fresh interpreter with the non-interactive Agg backend, exactly
as tests/test_tutorials.py runs it (there into a temporary folder instead).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(prefixes):
    tutorials = sorted(p for p in HERE.glob("[0-9]*.py") if not prefixes or p.name.startswith(tuple(prefixes)))
    if not tutorials:
        sys.exit(f"no tutorial in {HERE} starts with {' or '.join(prefixes)}")
    env = dict(os.environ, MPLBACKEND="Agg", MINIMAMBA_FIGURES_DIR=str(HERE / "figures"))
    env.setdefault("OMP_NUM_THREADS", "1")  # the timings in tutorial 4 are single-threaded
    env["MINIMAMBA_TUTORIAL_FULL"] = "1"  # tutorial 9 trains its full version (minutes); the tests run a short one
    for path in tutorials:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(path)], cwd=HERE, env=env, capture_output=True, text=True)
        saved = [line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("saved ")]
        print(f"{path.name}: exit {proc.returncode} in {time.perf_counter() - start:.1f} s; wrote {saved}")
        if proc.returncode != 0:
            sys.exit(proc.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
