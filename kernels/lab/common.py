"""What every lab script shares: the device, the log, the timers and the comparison that prints numbers.

On a GPU the arrays are CuPy and the timers read CUDA events; under the CUDA
simulator (NUMBA_ENABLE_CUDASIM=1, set before numba is imported) the arrays are
NumPy and a "time" is one call's wall clock, which only shows the script runs.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np

from minimamba.kernels import cuda as kc

SIMULATOR = kc.SIMULATOR
LOG = io.StringIO()  # everything said, for gpu_check's log file
START = time.perf_counter()


def elapsed():
    """Seconds since the lab was imported (the time budget of gpu_check counts from here)."""
    return time.perf_counter() - START


def say(*parts):
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    LOG.write(line + "\n")


def xp():
    """The array module of the kernels' arrays: CuPy on a GPU, NumPy under the simulator."""
    if SIMULATOR:
        return np
    import cupy

    return cupy


def to_device(array):
    return None if array is None else xp().asarray(array)


def to_host(array):
    return np.asarray(array) if SIMULATOR else array.get()


def compare(name, got, ref, tol):
    """Max abs and rel error of got against ref (host arrays), llm.c style: the figures and the first values.

    Passes when max |got - ref| <= tol * (1 + max |ref|); returns (passed, max rel error).
    """
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        say(f"  {name}: shape {got.shape} != reference {ref.shape}  FAIL")
        return False, float("inf")
    err = float(np.abs(got - ref).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    passed = err <= tol * (1 + scale)
    first = ", ".join(f"{g:.6g}/{r:.6g}" for g, r in zip(got.ravel()[:3], ref.ravel()[:3]))
    say(f"  {name}: max abs err {err:.2e}, max rel err {err / max(scale, 1e-30):.2e}, first (got/ref) {first}  "
        f"{'ok' if passed else 'FAIL'}")
    return passed, err / max(scale, 1e-30)


def sync():
    if not SIMULATOR:
        import cupy

        cupy.cuda.Device().synchronize()


def wall(fn, reps, warmup=1, synchronize=sync):
    """Seconds per call, wall clock, the GPU synchronised (by `synchronize`) before and after."""
    for _ in range(warmup):
        fn()
    synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    synchronize()
    return (time.perf_counter() - start) / reps


def event_time(fn, reps, warmup=1):
    """Seconds per call on the GPU timeline (CUDA events)."""
    if SIMULATOR:
        return wall(fn, 1, 0)
    import cupy

    for _ in range(warmup):
        fn()
    begin, end = cupy.cuda.Event(), cupy.cuda.Event()
    begin.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(begin, end) / 1e3 / reps


def kernel_time(fn, reps=3):
    """Seconds per call of fn's GPU work alone: the launches queue behind ~4 ms of busy work, so the events
    bracket the kernels back to back, without the host's launch time (~15 us an argument) between them."""
    if SIMULATOR:
        return wall(fn, 1, 0)
    import cupy

    busy = cupy.ones(2**27, dtype=cupy.float32)  # 512 MiB: each pass ~0.25 ms of GPU time
    fn()
    begin, end = cupy.cuda.Event(), cupy.cuda.Event()
    total = 0.0
    for _ in range(reps):
        for _ in range(16):
            busy *= 1.0
        begin.record()
        fn()
        end.record()
        end.synchronize()
        total += cupy.cuda.get_elapsed_time(begin, end) / 1e3
    return total / reps


def copy_bandwidth(nbytes=1 << 30):
    """Device-to-device copy, read + write bytes per second: the practical ceiling of a memory-bound kernel."""
    module = xp()
    src = module.ones(nbytes // 4, dtype=np.float32)
    dst = module.empty_like(src)
    seconds = event_time(lambda: module.copyto(dst, src), reps=10)
    bandwidth = 2 * src.nbytes / seconds
    say(f"device-to-device copy of {nbytes / 2**20:.0f} MiB: {bandwidth / 1e9:,.0f} GB/s (read + write)")
    return bandwidth


def device_name():
    if SIMULATOR:
        return "CUDA simulator"
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    return name.decode() if isinstance(name, bytes) else name


def parser(module, doc):
    """The arguments every lab script takes: --versions and --check-only."""
    result = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n")[0])
    result.add_argument("--versions", default="", help="comma-separated numbers or names (all when empty)")
    result.add_argument("--check-only", action="store_true", help="check every version, time none")
    return result


def select(versions, spec):
    """The versions named in spec (numbers or names, comma-separated; all when empty), each said with its idea."""
    wanted = set(filter(None, spec.split(",")))
    chosen = [v for v in versions if not wanted or str(v[0]) in wanted or v[1] in wanted]
    for number, name, idea, _ in chosen:
        say(f"version {number} {name:8s} {idea}")
    return chosen


def failures(errors):
    """The names whose check failed (an infinite error) in a check's {name: max rel error}."""
    return [name for name, err in errors.items() if not err < float("inf")]


def verdict(failed):
    say("FAILED: " + ", ".join(failed) if failed else "all versions agree with the reference")
    return 1 if failed else 0
