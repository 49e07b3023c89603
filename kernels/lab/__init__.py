"""The kernel lab: versions of the GPU kernels competing beside the library (llm.c's dev/cuda idea).

One file per op, its versions numbered with a one-line idea each, each file a script that checks
every version against its readable twin in minimamba.ops and times it (CuPy on a GPU, tiny shapes
under NUMBA_ENABLE_CUDASIM=1). The library (kernels/cuda.py) runs one version of each op; the
measured figures of every version are in kernels/lab/README.md.

    scan.py     selective_scan_fn: 1 v1, 2 chunked (the library's), 3 v3
    linear.py   linear for the captured decode step: 1 v1 (the library's), 2 v2
    model.py    the whole model: logits vs CPU float64, prefill and decode beside transformers
    common.py   the device, the log, the timers, the comparison
    run_all_gpu.sh   every measurement at once (kernels/gpu_check.py), for a session with a GPU
"""
