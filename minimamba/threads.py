"""Thread-pool settings that must be in place before NumPy and Numba start their threads.

A prefill alternates between NumPy's matmuls (OpenBLAS's thread pool) and the Numba
kernels (Numba's OpenMP pool). After its work each pool keeps its threads spinning
for a while (OpenBLAS for 2^28 cycles, about 0.1 s; GNU OpenMP for 300,000 spins),
so on a machine with few cores the two pools take the cores from each other: on the
2-core reference machine a 512-token prefill of the 130m shape took 0.97 s with the
default spins and 0.62 s with these. Decode keeps its speed: 2^20 cycles (~0.4 ms)
is still longer than the gap between two matmuls of a decode step, so OpenBLAS's
threads stay awake through it.

Set with os.environ.setdefault, so a value the user chose wins, and not at all when
MINIMAMBA_THREAD_SETTINGS=0. OpenBLAS reads its variable once, when NumPy is first
imported, so it takes effect only if minimamba is imported before NumPy (the
`minimamba` command always is); APPLIED says whether it did.

GOMP_SPINCOUNT reaches every GNU OpenMP user in the process, torch included, which
is why `minimamba bench --vs transformers` runs transformers in a child process
started with original_environ().
"""

import os
import sys

SETTINGS = {"OPENBLAS_THREAD_TIMEOUT": "20", "GOMP_SPINCOUNT": "10000"}
SET_HERE = []  # the variables minimamba set (not the user); minimamba.kernels adds its own

ENABLED = os.environ.get("MINIMAMBA_THREAD_SETTINGS", "1") != "0"
APPLIED = ENABLED and "numpy" not in sys.modules  # NumPy not loaded yet: OpenBLAS will read the setting
for _name, _value in SETTINGS.items():
    if ENABLED and _name not in os.environ:
        os.environ[_name] = _value
        SET_HERE.append(_name)


def original_environ() -> dict:
    """os.environ without the variables minimamba set: the environment the user started with."""
    return {name: value for name, value in os.environ.items() if name not in SET_HERE}


def note() -> str:
    """One line for benchmarks: the settings in force, and whether OpenBLAS saw its own."""
    values = ", ".join(f"{name}={os.environ.get(name)}" for name in SETTINGS)
    if not ENABLED:
        return f"thread spins: {values} (MINIMAMBA_THREAD_SETTINGS=0: minimamba set nothing)"
    if APPLIED:
        return f"thread spins: {values}"
    return (f"thread spins: {values}, but NumPy was imported before minimamba, so OpenBLAS kept its default "
            "(import minimamba first, or export OPENBLAS_THREAD_TIMEOUT=20)")
