"""`cuda.compile_ptx` of every kernel (the library's and the lab's) with its explicit signature, no GPU needed.

The simulator runs kernels as Python and checks no types; NVVM does. This runs
in a child process without NUMBA_ENABLE_CUDASIM (the simulator replaces
compile_ptx), and skips with the reason when numba-cuda or NVVM is missing
(NVVM comes with `pip install numba-cuda[cu13]`, or a CUDA toolkit).
"""

import os
import subprocess
import sys

import pytest

from gpu_helpers import SIMULATOR

SCRIPT = r"""
import sys, time
import numpy as np
try:
    from numba import cuda
    from minimamba.kernels import cuda as kc
except ImportError as err:
    print(f"SKIP numba-cuda not importable: {err}"); sys.exit(3)
try:
    cuda.get_current_device()
except Exception:
    # Device functions (kernels.cuda._device) are compiled for the current device's compute capability;
    # without a GPU, name the one every kernel here is compiled for (sm_90), so compile_ptx needs no driver.
    import types
    import numba.cuda.dispatcher as dispatcher
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
REGISTERS_ONLY = {"scan_v3_state", "scan_v3_output", "linear_v2"}  # states / output tiles held in registers:
# a local-memory array there would cost the speed these kernels exist for


def check(name, func, sig, label, dtype):
    start = time.perf_counter()
    try:
        ptx, _ = cuda.compile_ptx(func, sig, cc=(9, 0), fastmath=dtype == np.float32)
    except Exception as err:
        text = f"{type(err).__name__}: {err}"
        if any(word in text.lower() for word in ("nvvm", "libnvrtc", "dynamiclibnotfound", "cuda_home")):
            print(f"SKIP NVVM not available: {text[:300]}"); sys.exit(3)
        print(f"FAIL {name} {label}: {text}"); sys.exit(1)
    assert ".entry" in ptx, name
    local = ptx.count("ld.local") + ptx.count("st.local")
    print(f"ok {name:14s} {label}: {len(ptx.splitlines())} PTX lines, "
          f"{local} local-memory accesses, {time.perf_counter() - start:.1f}s")
    if name in REGISTERS_ONLY and local:
        print(f"FAIL {name} {label}: {local} local-memory accesses (its arrays should live in registers)"); sys.exit(1)


cases = [(16, np.float32), (16, np.float64), (3, np.float32)]
for n, dtype in cases:
    sigs = kc.kernel_signatures(dtype)
    for name, func in kc.kernel_functions(n, dtype).items():
        if n == 3 and not (name.startswith("scan") or name.startswith("chunk") or name == "state_update"):
            continue
        check(name, func, sigs[name], f"n={n:2d} {np.dtype(dtype).name}", dtype)
# the lab's versions: every v3 layout the sweep times, every row tile of linear v2 (float32, the benchmarked dtype)
from minimamba.kernels.lab import linear as lab_linear, scan as lab_scan
for n, dtype in cases:
    sigs = lab_scan.kernel_signatures(dtype)
    for layout in lab_scan.V3_CANDIDATES if (n, dtype) == (16, np.float32) else [lab_scan.V3_LAYOUT]:
        for name, func in lab_scan.kernel_functions(n, dtype, layout).items():
            check(name, func, sigs[name], f"n={n:2d} {np.dtype(dtype).name} {tuple(layout)}", dtype)
for dtype in (np.float32, np.float64):
    sigs = lab_linear.kernel_signatures(dtype)
    tiles = lab_linear.LINEAR_V2_ROWS_PER_THREAD
    for rows in tiles if dtype == np.float32 else tiles[-1:]:
        func = lab_linear.kernel_functions(dtype, rows_per_thread=rows)["linear_v2"]
        check("linear_v2", func, sigs["linear_v2"], f"{np.dtype(dtype).name}, {rows} rows a thread", dtype)
print("ALL OK")
"""


@pytest.mark.skipif(not SIMULATOR, reason="on a GPU the kernels are compiled by the other tests anyway")
def test_every_kernel_compiles_to_ptx():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    print(proc.stdout, proc.stderr[-2000:])
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]
