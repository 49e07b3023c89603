"""The GPU check: the one command to run whenever a GPU is at hand (under 10 minutes on one H200).

    python -m minimamba.kernels.gpu_check [--budget SECONDS] [--skip-tests] [--skip-transformers] [--quick]
                                          [--only tests,model,scan,linear]
    bash kernels/lab/run_all_gpu.sh       (the same with every measurement, the results into $OUT)

(from a source checkout with minimamba installed, `pip install -e .`: tests/gpu must sit beside
the package). It is a thin entry point over the kernel lab (kernels/lab/):

1. runs tests/gpu on the GPU (MINIMAMBA_GPU_TESTS=1, CuPy arrays, real kernels), which includes
   each lab script's check of every version against minimamba.ops;
2. lab/model.py: the logits of a random 130m-shape model on the GPU against the CPU float64 path,
   prefill and decode (eager, and CUDA graph with each lab linear version) beside transformers;
3. lab/scan.py: every scan version at 1x1536x8192, 1x1536x512 and 16x1536x8192 against the
   measured copy bandwidth, v3's layouts and chunk sizes swept at 8192;
4. lab/linear.py: every linear version on the 130m decode projections at batch 1 and 64;
5. prints the table (each version, each target, transformers beside it) and which library
   default to flip: a lab version that wins is promoted into kernels/cuda.py (kernels/lab/README.md).

Every section is guarded: an error is printed and the check goes on. The table goes to
$OUT/gpu_check.txt and the whole log to $OUT/gpu_check_log.txt when OUT is set.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import traceback
from pathlib import Path

if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"  # where numba-cuda may find NVVM when no wheel ships it
os.environ.pop("NUMBA_ENABLE_CUDASIM", None)  # this check is about the real GPU

import numpy as np  # noqa: E402

from minimamba.kernels.lab.common import LOG, elapsed, say  # noqa: E402

CARD_BANDWIDTH = 4.8e12  # bytes/s, H200 datasheet; the scan target counts against the measured copy bandwidth
DECODE_B1_TARGET, DECODE_B64_TARGET, SCAN_TARGET = 700, 10_000, 0.5  # tok/s, tok/s, share of the copy bandwidth


def section(title):
    say(f"\n=== {title}  [{elapsed():.0f}s]")


def guarded(results):
    """run(title, func): run a section, log any error, never stop the check."""

    def run(title, func):
        section(title)
        try:
            return func()
        except Exception:  # noqa: BLE001 - the check reports and carries on
            say(f"ERROR in {title}:\n{traceback.format_exc()}")
            results.setdefault("errors", []).append(title)
            return None

    return run


def environment(results):
    import cupy

    say(f"python {sys.version.split()[0]}, numpy {np.__version__}, cupy {cupy.__version__}")
    for name in ("numba", "numba_cuda", "torch", "transformers"):
        try:
            module = __import__(name)
            say(f"{name} {getattr(module, '__version__', '?')}")
        except Exception as err:  # noqa: BLE001
            say(f"{name}: not importable ({type(err).__name__}: {err})")
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    results["device"] = name
    results["sms"] = props["multiProcessorCount"]
    say(f"device {name}, {props['multiProcessorCount']} SMs, {props['totalGlobalMem'] / 2**30:.0f} GiB, "
        f"CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, driver {cupy.cuda.runtime.driverGetVersion()}")
    say(f"CUDA_HOME={os.environ.get('CUDA_HOME')}")


def gpu_tests(results, timeout):
    root = Path(__file__).resolve().parents[1]
    tests = root / "tests" / "gpu"
    if not tests.is_dir():
        say(f"tests/gpu not found beside the package ({tests}); run from a source checkout")
        results["tests"] = "not found"
        return
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["MINIMAMBA_GPU_TESTS"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)]
    say(" ".join(cmd))
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"")
        say(f"tests/gpu timed out after {timeout}s\n{out[-3000:] if isinstance(out, str) else out.decode()[-3000:]}")
        results["tests"] = f"timed out ({timeout}s)"
        return
    tail = (proc.stdout + proc.stderr)[-6000:]
    say(tail)
    summary = [line for line in proc.stdout.splitlines() if " passed" in line or " failed" in line or "error" in line]
    results["tests"] = (summary[-1].strip() if summary else f"exit code {proc.returncode}")



def lab_scan(results):
    from minimamba.kernels.lab import scan

    results["copy_bw"] = copy_bw = scan.copy_bandwidth()
    for b, l, sweep in ((1, 8192, True), (1, 512, False), (16, 8192, True)):
        scan.bench(b, l, copy_bw=copy_bw, sweep=sweep, results=results)


def lab_linear(results):
    from minimamba.kernels.lab import linear

    linear.bench((1, 64), results=results)


# ---------------------------------------------------------------- table


def table(results):
    def fmt(key, unit="tok/s"):
        value = results.get(key)
        return "-" if value is None else f"{value:,.0f} {unit}"

    def milliseconds(key):
        value = results.get(key)
        return "-" if value is None else f"{value * 1e3:,.2f} ms a step"

    copy_bw = results.get("copy_bw")
    ceiling = copy_bw or CARD_BANDWIDTH

    def scan_text(bw, seconds):
        return f"{bw / 1e9:,.0f} GB/s = {bw / ceiling:.0%} ({seconds * 1e6:,.0f} us)"

    def scan(key):
        value = results.get(key)
        return "-" if value is None else scan_text(*value[:2])

    def best_v3(key):
        value = results.get(key)
        if value is None:
            return "-"
        bw, seconds, layout, chunk = value
        return f"{scan_text(bw, seconds)} {layout} chunk {chunk or 'auto'}"

    def ahead(ours, theirs):
        a, b = results.get(ours), results.get(theirs)
        return "-" if a is None or b is None else f"{a / b:.1f}x"

    ours, torch_err = results.get("err_cuda_nocache"), results.get("err_torch")
    if ours is not None:
        # the cross-checking contract (DESIGN.md, 11): float32 error no worse than transformers' own float32 error
        # (25% slack for the different summation orders); 1e-3 relative when transformers did not run.
        limit = 1.25 * torch_err if torch_err is not None else 1e-3
        results["logits_check"] = f"{'PASS' if ours <= limit else 'FAIL'} ({ours:.1e} vs limit {limit:.1e})"
    copy = "measured copy" if copy_bw else "4.8 TB/s (copy not measured)"
    rows = [
        ("prefill 512 tokens (b=1)", fmt("prefill_512"), fmt("torch_prefill_512"), "ahead of torch",
         ahead("prefill_512", "torch_prefill_512")),
        ("prefill 8192 tokens (b=1)", fmt("prefill_8192"), fmt("torch_prefill_8192"), "ahead of torch",
         ahead("prefill_8192", "torch_prefill_8192")),
    ]
    for batch, target in ((1, f">= {DECODE_B1_TARGET:,} tok/s"), (64, f">= {DECODE_B64_TARGET:,} tok/s")):
        theirs = f"torch_decode_b{batch}"
        rows += [(f"decode b={batch}, {label}", fmt(key), fmt(theirs) if label == "eager" else "",
                  "" if label == "eager" else target, ahead(key, theirs))
                 for label, key in (("eager", f"decode_b{batch}_eager"),
                                    ("CUDA graph, linear 1 v1*", f"decode_b{batch}_graph"),
                                    ("CUDA graph, linear 2 v2*", f"decode_b{batch}_v2_graph"))]
        rows += [(f"  decode projections b={batch}, linear {number} {name}", milliseconds(f"linear_b{batch}_{name}"),
                  "", "", "") for number, name in ((1, "v1"), (2, "v2"))]
    rows += [
        ("scan 1x1536x8192, 1 v1", scan("scan_1x8192_v1"), "", "", ""),
        ("scan 1x1536x8192, 2 chunked", scan("scan_1x8192_chunked"), "", f">= 50% of {copy}", ""),
        ("scan 1x1536x8192, 3 v3", scan("scan_1x8192_v3"), "", f">= 50% of {copy}", ""),
        ("scan 1x1536x8192, 3 v3 best layout", best_v3("scan_1x8192_v3best"), "", "", ""),
        ("scan 16x1536x8192, 1 v1", scan("scan_16x8192_v1"), "", "", ""),
        ("scan 16x1536x8192, 2 chunked", scan("scan_16x8192_chunked"), "", "", ""),
        ("scan 16x1536x8192, 3 v3", scan("scan_16x8192_v3"), "", "", ""),
        ("scan 16x1536x8192, 3 v3 best layout", best_v3("scan_16x8192_v3best"), "", "", ""),
        ("logits rel err vs f64 CPU (no cache)", _e(results.get("err_cuda_nocache")), _e(results.get("err_torch")),
         "<= transformers'", ""),
        ("  same, prefill + 4 decode steps", _e(results.get("err_cuda")), "", "", ""),
    ]
    head = ("", "minimamba (CuPy+Numba)", "transformers (torch)", "target", "ratio")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
    lines = [f"GPU check, {results.get('device', '?')}, random 130m-shape Mamba, float32",
             " | ".join(h.ljust(w) for h, w in zip(head, widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.append("* CUDA graph of kernels.cuda_graph.decode_logits (projections by a Numba kernel: CuPy will not "
                 "capture cuBLAS); decode projections: their kernel time a step (24 layers + head)")
    lines.append(f"measured device copy bandwidth: {copy_bw / 1e9:,.0f} GB/s" if copy_bw else "")
    lines.append(f"GPU tests: {results.get('tests', '-')};  logits check: {results.get('logits_check', '-')};  "
                 f"graph vs eager max diff: b1 {_e(results.get('graph_diff_b1'))}, "
                 f"b64 {_e(results.get('graph_diff_b64'))}, with linear v2: b1 {_e(results.get('graph_diff_b1_v2'))}, "
                 f"b64 {_e(results.get('graph_diff_b64_v2'))}")
    lines.append("targets (best measured, library or lab): " + "; ".join(verdicts(results, ceiling)))
    lines += choices(results)
    for key in ("b1", "b64", "b1_v2", "b64_v2"):
        if results.get(f"decode_{key}_graph_error"):
            lines.append(f"CUDA graph, {key}: {results[f'decode_{key}_graph_error'][:160]}")
    if results.get("scan_mismatch"):
        lines.append(f"SCAN MISMATCH against v1 (> 1e-3 relative): {'; '.join(results['scan_mismatch'])}")
    if results.get("errors"):
        lines.append(f"sections with errors: {', '.join(results['errors'])}")
    lines.append(f"total time {elapsed():.0f}s")
    return "\n".join(lines)


def verdicts(results, ceiling):
    """MET or MISSED for each of issue 16's targets, on the best version measured."""
    out = []
    for batch, target in ((1, DECODE_B1_TARGET), (64, DECODE_B64_TARGET)):
        best = max((results.get(f"decode_b{batch}_{k}") or 0 for k in ("eager", "graph", "v2_graph")), default=0)
        if best:
            theirs = results.get(f"torch_decode_b{batch}")
            vs = f", {best / theirs:.1f}x transformers" if theirs else ""
            out.append(f"decode b={batch} {'MET' if best >= target else 'MISSED'} ({best:,.0f} tok/s{vs})")
    scans = [(results[k][0], k.split("_")[-1]) for k in ("scan_1x8192_chunked", "scan_1x8192_v3",
                                                         "scan_1x8192_v3best") if results.get(k)]
    if scans:
        bw, name = max(scans)
        met = "MET" if bw >= SCAN_TARGET * ceiling else "MISSED"
        out.append(f"scan 1x1536x8192 {met} ({bw / ceiling:.0%}, {name})")
    for length in (512, 8192):
        ours, theirs = results.get(f"prefill_{length}"), results.get(f"torch_prefill_{length}")
        if ours and theirs:
            out.append(f"prefill {length} {'MET' if ours > theirs else 'MISSED'} ({ours / theirs:.1f}x transformers)")
    if results.get("logits_check"):
        out.append(f"logits {results['logits_check']}")
    return out


def choices(results):
    """Which library default this run settles: a lab version that wins is promoted into kernels/cuda.py."""
    lines = ["choices (library: scan 2 chunked for long prompts, linear 1 v1; lab: scan 3 v3, linear 2 v2):"]
    wins = []
    for shape in ("1x8192", "16x8192"):
        old, new, best = (results.get(f"scan_{shape}_{v}") for v in ("chunked", "v3", "v3best"))
        if old and new:
            new_bw = max(new[0], best[0]) if best else new[0]
            winner = "v3" if new_bw > old[0] else "chunked"
            wins.append(winner)
            text = (f"  scan {shape}: chunked {old[0] / 1e9:,.0f} GB/s vs v3 {new[0] / 1e9:,.0f} GB/s -> {winner} "
                    f"({max(old[0], new_bw) / min(old[0], new_bw):.2f}x)")
            if best:
                text += f"; best v3 {best[0] / 1e9:,.0f} GB/s with V3_LAYOUT {best[2]}, chunk {best[3] or 'auto'}"
            lines.append(text)
    if len(wins) == 2:
        verdict = {("v3", "v3"): "promote lab scan 3 (v3, its best layout) to the library's long-prompt scan",
                   ("chunked", "chunked"): "keep scan 2 (chunked) as the library's long-prompt scan"}
        lines.append(f"  => {verdict.get(tuple(wins), 'mixed: promote v3 for the shapes it wins (rows b * d)')}")
    for batch in (64, 1):
        old, new = results.get(f"decode_b{batch}_graph"), results.get(f"decode_b{batch}_v2_graph")
        if old and new:
            winner = "v2" if new > old else "v1"
            lines.append(f"  decode b={batch} CUDA graph: linear v1 {old:,.0f} tok/s vs v2 {new:,.0f} tok/s "
                         f"-> {winner} ({max(old, new) / min(old, new):.2f}x)")
    b64 = results.get("decode_b64_graph"), results.get("decode_b64_v2_graph")
    b1 = results.get("decode_b1_graph"), results.get("decode_b1_v2_graph")
    if all(b64):
        if b64[1] > b64[0]:
            rows = "every batch" if all(b1) and b1[1] > b1[0] else "batches of 2 rows or more (v1 keeps batch 1)"
            lines.append(f"  => promote lab linear 2 (v2) to the library's linear for {rows}")
        else:
            lines.append("  => keep linear 1 (v1) as the library's linear")
    return lines


def _e(value):
    return "-" if value is None else f"{value:.1e}"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minimamba.kernels.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=420, help="seconds after which heavy sections are skipped")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smaller benchmarks (a smoke run)")
    parser.add_argument("--only", default="", help="comma-separated subset of: tests,model,scan,linear")
    args = parser.parse_args(argv)
    only = set(filter(None, args.only.split(",")))
    results = {}
    run = guarded(results)

    def wanted(name):
        return not only or name in only

    def within_budget(title, func):
        if elapsed() > args.budget:
            section(title)
            say(f"skipped: past the time budget ({elapsed():.0f}s > {args.budget:.0f}s)")
        else:
            run(title, func)

    run("environment", lambda: environment(results))
    if not args.skip_tests and wanted("tests"):
        run("GPU test suite (tests/gpu on the GPU)",
            lambda: gpu_tests(results, timeout=max(60, min(240, args.budget * 0.4))))
    if wanted("model"):
        from minimamba.kernels.lab import model

        model.run_all(results, quick=args.quick, transformers=not args.skip_transformers, budget=args.budget,
                      guard=run)
    if wanted("scan"):
        within_budget("lab/scan.py: every scan version, bandwidth", lambda: lab_scan(results))
    if wanted("linear"):
        within_budget("lab/linear.py: every linear version on the decode projections", lambda: lab_linear(results))
    section("table")
    text = table(results)
    say(text)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gpu_check.txt").write_text(text + "\n")
        Path(out, "gpu_check_log.txt").write_text(LOG.getvalue())
        say(f"wrote {out}/gpu_check.txt and gpu_check_log.txt")
    failed = (results.get("errors") or results.get("scan_mismatch")
              or str(results.get("logits_check", "")).startswith("FAIL"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
