"""impl="auto" on NumPy arrays: per call, the NumPy function or the Numba kernel, whichever is faster there.

A Numba kernel beats NumPy's vectorised functions only when the call has enough
work: below that, NumPy's few array operations cost less than a kernel's entry and
its thread hand-off. The work of a call is counted in numbers touched (see `WORK`);
CROSSOVERS gives, for each kernel, the work from which Numba was faster when
measured (`python -m minimamba.dispatch` measures them again on your machine and
prints the table to paste here).

Numba is imported, and its kernels loaded from the disk cache (or compiled, the
first time: minutes on a small machine), only when loading pays (LOAD_NOW_WORK,
LOAD_AFTER_S below). So `minimamba generate "ROMEO:"` on the built-in model (d 256)
never loads Numba, and a short run does not pay Numba's start-up. A load or compile
that takes more than a second says so on stderr while it runs.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np

from . import ops

# Work (numbers) from which the warm Numba kernel was faster than NumPy's: float32, d 256 to
# 1536, alternately, best of 7, on the 2-core reference machine while it was shared (load ~8;
# `python -m minimamba.dispatch` prints the full table). The serial kernels won at every size
# but the scan of a single token (NumPy's few operations then cost less than the kernel's setup).
CROSSOVERS = {
    "selective_scan_fn": 1 << 15,  # b * e * l * n: from 2 tokens at the 130m width (e 1536), 4 at e 512
    "selective_state_update": 0,  # b * e * n
    "causal_conv1d_fn": 0,  # b * e * (l + k)
    "causal_conv1d_update": 0,  # b * e * (l + k)
    "rms_norm": 0,  # b * l * d
}

# Loading Numba and its kernels from the disk cache costs 0.5-2 s once per process (compiling
# them the first time, minutes), more than the kernels save in a short run: the built-in model
# decodes ~2 ms a token faster (0.2 s over 100 tokens). So Numba loads only when it will pay:
# at a call whose NumPy version takes tens of milliseconds (a prefill of 128 tokens at d 768),
# or once the calls NumPy ran in Numba's place have taken LOAD_AFTER_S in all, about what
# loading costs (a long generation: at worst twice the best choice made in hindsight, the
# rent-or-buy rule).
LOAD_NOW_WORK = 1 << 20
LOAD_AFTER_S = 1.0

WORK = {  # the numbers a call touches, from its first arguments
    "selective_scan_fn": lambda u, delta, A, *a, **k: u.size * A.shape[-1],
    "selective_state_update": lambda state, *a, **k: state.size,
    "causal_conv1d_fn": lambda x, weight, *a, **k: x.size + x.size // x.shape[-1] * weight.shape[-1],
    "causal_conv1d_update": lambda x, conv_state, *a, **k: x.size + conv_state.size,  # state: (b, e, k)
    "rms_norm": lambda x, *a, **k: x.size,
}

SLOW_LOAD_S = 1.0  # say what is happening when loading or compiling kernels takes longer than this


def numba_available() -> bool:
    """Whether numba can be imported, without importing it (that alone takes ~0.5 s)."""
    if "numba" in sys.modules:
        return sys.modules["numba"] is not None
    try:
        return importlib.util.find_spec("numba") is not None
    except (ImportError, ValueError):
        return False


_cpu = None  # minimamba.kernels.cpu once a call needed it
_loaded = set()  # (kernel, dtype, parallel) whose first call has run: its compiled code is in memory
_numpy_time_above = [0.0]  # seconds NumPy spent in calls Numba would have taken, before Numba loaded


def _load_cpu():
    global _cpu
    if _cpu is None:
        with _say_if_slow("importing Numba and its kernels"):
            from .kernels import cpu

        _cpu = cpu
    return _cpu


def loaded() -> bool:
    """Whether impl="auto" has loaded the Numba kernels in this process."""
    return _cpu is not None


class _say_if_slow:
    """A context: if the block runs longer than SLOW_LOAD_S, print what it is doing, then how long it took."""

    def __init__(self, what):
        self.what = what
        self.said = False

    def _say(self):
        self.said = True
        print(f"minimamba: {self.what} (the first run compiles them, later runs load them from Numba's "
              "disk cache) ...", file=sys.stderr, flush=True)

    def __enter__(self):
        self.start = time.perf_counter()
        self.timer = threading.Timer(SLOW_LOAD_S, self._say)
        self.timer.daemon = True
        self.timer.start()

    def __exit__(self, *exc):
        self.timer.cancel()
        if self.said:
            print(f"minimamba: {self.what}: done in {time.perf_counter() - self.start:.1f} s",
                  file=sys.stderr, flush=True)


def _dispatcher(name):
    numpy_fn = getattr(ops, name)
    work_of = WORK[name]
    crossover = CROSSOVERS[name]

    def kernel(*args, **kwargs):
        work = work_of(*args, **kwargs)
        if crossover is None or work < crossover or not isinstance(args[0], np.ndarray):
            return numpy_fn(*args, **kwargs)
        if _cpu is None and work < LOAD_NOW_WORK and _numpy_time_above[0] < LOAD_AFTER_S:
            start = time.perf_counter()  # not worth loading Numba yet: NumPy, and count what it cost
            out = numpy_fn(*args, **kwargs)
            _numpy_time_above[0] += time.perf_counter() - start
            return out
        fn = getattr(_load_cpu(), name)
        key = (name, args[0].dtype, work >= _cpu.PARALLEL_MIN)  # each its own compiled core in kernels.cpu
        if key in _loaded:
            return fn(*args, **kwargs)
        with _say_if_slow(f"loading the Numba kernel {name} ({args[0].dtype})"):
            out = fn(*args, **kwargs)
        _loaded.add(key)
        return out

    kernel.__name__ = kernel.__qualname__ = name
    kernel.__doc__ = (f"minimamba.ops.{name} below {crossover} numbers of work (or before Numba pays its "
                      "loading), else minimamba.kernels.cpu's.")
    return kernel


def auto_kernels(kernel_names) -> SimpleNamespace:
    """The namespace impl="auto" gives on NumPy arrays: per call NumPy or Numba; all NumPy without numba."""
    if not numba_available():
        return SimpleNamespace(name="numpy", **{k: getattr(ops, k) for k in kernel_names})
    return SimpleNamespace(name="auto", **{k: _dispatcher(k) for k in kernel_names})


# ---------------------------------------------------------------- measuring the crossovers


def _cases(name, d, size, rng, dtype):
    """Arguments of `name` for a call of about `size` tokens (decode kernels: batch rows) at width d."""
    e, n, k = 2 * d, 16, 4
    r = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    if name == "selective_scan_fn":
        return (r(1, e, size), r(1, e, size), -np.exp(r(e, n)), r(1, n, size), r(1, n, size)), dict(
            D=r(e), z=r(1, e, size), delta_bias=r(e), delta_softplus=True, return_last_state=True)
    if name == "selective_state_update":
        return (r(size, e, n), r(size, e), r(size, e), -np.exp(r(e, n)), r(size, n), r(size, n)), dict(
            D=r(e), z=r(size, e), dt_bias=r(e), dt_softplus=True)
    if name == "causal_conv1d_fn":
        return (r(1, e, size), r(e, k), r(e)), dict(activation="silu")
    if name == "causal_conv1d_update":
        return (r(size, e), r(size, e, k), r(e, k), r(e)), dict(activation="silu")
    return (r(1, size, d), r(d)), {}


def measure(widths=(256, 768, 1536), sizes=(1, 2, 4, 8, 16, 64, 256), repeat=7, dtype="float32"):
    """Time NumPy against Numba, alternately, for every kernel, width and size; print the crossovers."""
    cpu = _load_cpu()
    rng = np.random.default_rng(0)
    print(f"{'kernel':24}{'d':>6}{'size':>6}{'work':>10}{'numpy us':>10}{'numba us':>10}")
    for name in CROSSOVERS:
        results = []  # (work, numba faster)
        for d in widths:
            for size in sizes:
                args, kwargs = _cases(name, d, size, rng, dtype)
                fns = {"numpy": getattr(ops, name), "numba": getattr(cpu, name)}
                best = {}
                for which, fn in fns.items():
                    fn(*[a.copy() for a in args], **kwargs)  # warm: compile / load
                for _ in range(repeat):
                    for which, fn in fns.items():
                        copies = [a.copy() for a in args]  # the update kernels write their state
                        t = time.perf_counter()
                        fn(*copies, **kwargs)
                        best[which] = min(best.get(which, 1e9), time.perf_counter() - t)
                work = WORK[name](*args, **kwargs)
                print(f"{name:24}{d:>6}{size:>6}{work:>10}{1e6 * best['numpy']:>10.1f}{1e6 * best['numba']:>10.1f}")
                results.append((work, best["numba"] < best["numpy"]))
        losses = [work for work, won in results if not won]
        wins = [work for work, won in results if won and work > max(losses, default=0)]
        print(f"{name}: Numba faster at every work >= {min(wins) if wins else None} (table: {CROSSOVERS[name]})")


if __name__ == "__main__":
    measure()
