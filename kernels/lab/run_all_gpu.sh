#!/usr/bin/env bash
# Every measurement issue 16's targets need, in one run on a machine with a GPU (about 8-10 minutes
# on an H200; give it a 600 s limit and keep time for a rerun):
#
#   OUT=/tmp/gpu bash kernels/lab/run_all_gpu.sh [extra gpu_check flags, e.g. --quick or --skip-transformers]
#
# 1. the environment: the GPU, and the modules the run needs (nothing is installed or downloaded here);
# 2. python -m minimamba.kernels.gpu_check: tests/gpu on the GPU, logits vs CPU float64 and transformers,
#    prefill and decode (batch 1 and 64, eager and CUDA graph with each lab linear version) beside
#    transformers, the copy bandwidth, every lab scan version (v3's layouts swept), every lab linear version;
#    the table, MET / MISSED per target and which default to flip, into $OUT/gpu_check.txt (+ the log).
# BUDGET (seconds, default 330) is when gpu_check starts skipping its heavy sections.
set -uo pipefail

cd "$(dirname "$0")/../.."
export OUT="${OUT:-/tmp/minimamba_gpu}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python}"

echo "==> environment"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" - <<'PY'
import importlib, sys
needed = {"cupy": "pip install -e '.[gpu]' in the repository (CUDA 12) or '.[gpu-cuda13]'",
          "numba.cuda": "pip install 'numba-cuda>=0.30,<0.31'",
          "minimamba": "pip install -e . from the repository root"}
optional = {"torch": "a CUDA build of torch, for the comparison with transformers",
            "transformers": "pip install transformers, for the comparison"}
missing = False
for name, how in {**needed, **optional}.items():
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '')}")
    except Exception as err:  # noqa: BLE001
        print(f"{name}: not importable ({type(err).__name__}: {err}); {how}")
        missing = missing or name in needed
if missing:
    sys.exit("a module gpu_check needs is missing: see above")
PY
[ $? -eq 0 ] || exit 2

echo "==> python -m minimamba.kernels.gpu_check --budget ${BUDGET:-330} $*"
"$PYTHON" -m minimamba.kernels.gpu_check --budget "${BUDGET:-330}" "$@"
rc=$?
echo "==> gpu_check exit code $rc; table in $OUT/gpu_check.txt, log in $OUT/gpu_check_log.txt"
exit $rc
