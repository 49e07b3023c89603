"""The core needs neither torch nor transformers: loading and running a model imports neither."""

import os
import subprocess
import sys

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def test_no_torch_or_transformers_imported():
    code = ("import sys, numpy as np, minimamba\n"
            f"m = minimamba.MambaForCausalLM.from_pretrained({os.path.join(FIXTURES, 'bf16')!r})\n"
            "m(np.array([[1, 2, 3]]), labels=np.array([[1, 2, 3]]))\n"
            "heavy = sorted(k for k in ('torch', 'transformers', 'cupy') if k in sys.modules)\n"
            "print(heavy); sys.exit(1 if heavy else 0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"imported {result.stdout.strip()} {result.stderr[-500:]}"

