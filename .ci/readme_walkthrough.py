"""The README, walked through as a newcomer with only the repository would: run by .ci/run.

    python .ci/readme_walkthrough.py            (from the repository root; PYTHON=python3.12 to pick one)

In a fresh virtual environment of its own (a temporary folder), in README order:
  1. the two commands at the top, exactly as written (install + generate; install + the tests);
  2. every other `pip install ...` line of the README, each followed by `minimamba generate` on the
     built-in model; lines with the gpu or crosscheck extras are resolved with --dry-run only (no GPU
     here, and an unpinned torch is a multi-GB CUDA build: .ci/run installs and tests those);
  3. every ```bash and ```python block, in a scratch folder, offline (HF_HUB_OFFLINE=1).
A block preceded by `<!-- walkthrough: skip REASON -->` is listed, not run. Network: the package
index only (pip), never the Hugging Face Hub. Exits non-zero at the first failure, naming it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = time.time()


def step(text):
    print(f"\n==> [readme {time.time() - START:.0f}s] {text}", flush=True)


def blocks(readme):
    """[(language, code, skip reason or None)] for every fenced block, in order."""
    out = []
    for match in re.finditer(r"(<!-- walkthrough: skip ([^>]*)-->\s*)?```(\w*)\n(.*?)```", readme, re.S):
        out.append((match.group(3), match.group(4), match.group(2)))
    return out


def install_lines(readme, top):
    """Every `pip install ...` command in the README's text outside the top block, without duplicates."""
    found = []
    for line in re.findall(r"`(pip install [^`]+)`", readme.replace(top, "")):
        if line not in found and not line.startswith("pip install minimamba"):
            found.append(line)
    return found


def main():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    fenced = blocks(readme)
    lang, top, _ = fenced[0]
    if lang != "bash" or len(top.strip().splitlines()) != 2:
        sys.exit("readme walkthrough: the README must start with a ```bash block of two commands")
    with tempfile.TemporaryDirectory(prefix="minimamba-readme-") as tmp:
        venv = os.path.join(tmp, "venv")
        scratch = os.path.join(tmp, "scratch")
        os.makedirs(scratch)
        python = os.environ.get("PYTHON", "python3")
        step(f"fresh virtual environment ({python})")
        subprocess.run([python, "-m", "venv", venv], check=True)
        env = dict(os.environ, VIRTUAL_ENV=venv, PATH=os.path.join(venv, "bin") + os.pathsep + os.environ["PATH"],
                   HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
        env.pop("PYTHONPATH", None)

        def sh(command, cwd=ROOT):
            print(f"$ {command}", flush=True)
            result = subprocess.run(["bash", "-c", "set -eo pipefail\n" + command], cwd=cwd, env=env)
            if result.returncode != 0:
                sys.exit(f"readme walkthrough: `{command.strip()}` failed (exit {result.returncode})")

        for command in top.strip().splitlines():
            step("top of the README: " + command)
            sh(command)
        for line in install_lines(readme, top):
            heavy = "gpu" in line or "crosscheck" in line
            step(f"install line: {line}" + (" (resolved only: --dry-run)" if heavy else ""))
            sh(line + (" --dry-run" if heavy else ""))
            if not heavy:
                sh('minimamba generate "ROMEO:" --max-new-tokens 20 --seed 0')
        for i, (lang, code, skip) in enumerate(fenced[1:], start=2):
            if skip:
                step(f"block {i} ({lang}) skipped: {skip.strip()}")
                continue
            if lang == "python":
                step(f"block {i} (python)")
                path = os.path.join(scratch, f"block{i}.py")
                with open(path, "w", encoding="utf-8") as f:
                    f.write(code)
                sh(f"python {shlex.quote(path)}", cwd=scratch)
            elif lang == "bash":
                step(f"block {i} (bash)")
                sh(code, cwd=scratch)
    step("README walkthrough passed")


if __name__ == "__main__":
    main()
