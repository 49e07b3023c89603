"""Thread-pool settings that must be in place before NumPy and Numba start their threads.

A prefill alternates between NumPy's matmuls (OpenBLAS's thread pool) and the Numba
kernels (Numba's OpenMP pool). After its work each pool keeps its threads spinning
for a while (OpenBLAS for 2^28 cycles, about 0.1 s; GNU OpenMP for 300,000 spins),
so on a machine with few cores the two pools take the cores from each other: on the
2-core reference machine a 512-token prefill of the 130m shape took 0.97 s with the
default spins and 0.62 s with these. Decode keeps its speed: 2^20 cycles (~0.4 ms)
is still longer than the gap between two matmuls of a decode step, so OpenBLAS's
threads stay awake through it.

Set with os.environ.setdefault, so a value the user chose wins. OpenBLAS reads its
variable once, when NumPy is first imported, so it takes effect only if minimamba is
imported before NumPy (the `minimamba` command always is); APPLIED says whether it did.
"""

import os
import sys

SETTINGS = {"OPENBLAS_THREAD_TIMEOUT": "20", "GOMP_SPINCOUNT": "10000"}

APPLIED = "numpy" not in sys.modules  # NumPy not loaded yet: OpenBLAS will read the setting
for _name, _value in SETTINGS.items():
    os.environ.setdefault(_name, _value)


def note() -> str:
    """One line for benchmarks: the settings in force, and whether OpenBLAS saw its own."""
    values = ", ".join(f"{name}={os.environ.get(name)}" for name in SETTINGS)
    if APPLIED:
        return f"thread spins: {values}"
    return (f"thread spins: {values}, but NumPy was imported before minimamba, so OpenBLAS kept its default "
            "(import minimamba first, or export OPENBLAS_THREAD_TIMEOUT=20)")
