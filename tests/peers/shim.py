"""All the adaptation that lets the peers' unchanged code and tests run on minimamba.

The vendored files (see README.md here) stay byte for byte as released. What they
import and cannot have on a CPU-only machine is provided here instead:

    causal_conv1d_cuda                     the CUDA extension behind causal_conv1d.cpp_functions
    selective_scan_cuda                    the CUDA extension behind mamba_ssm's SelectiveScanFn / MambaInnerFn
    mamba_ssm.ops.triton.selective_state_update   the Triton kernel's module: `selective_state_update`
                                           calls minimamba, `selective_state_update_ref` is the
                                           vendored reference function, taken from the vendored file
    mamba_ssm.ops.triton.layer_norm        only `_layer_norm_fwd`, used by options the tests never set
    causal_conv1d.causal_conv1d_varlen     only the reference `causal_conv1d_varlen_states_ref`
                                           (the Triton kernel there has no minimamba twin)

Each stand-in converts torch tensors to NumPy arrays, calls the minimamba function of
the same name (`minimamba.ops` or `minimamba.kernels.cpu`, see `use`), and converts
back, writing in-place results (states, out=) into the caller's tensors. bfloat16, which
NumPy lacks, travels as float32 (exact) and is rounded back by torch, as the
references round their float32 results. Backward passes are not part of minimamba.ops:
the backward entry points raise `BackwardNotProvided`, which the runner reports as a
skip after the test's forward assertions have passed.

`CudaAsCpu` maps device="cuda" (and .to("cuda")) to the CPU while a peer test runs.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from minimamba import ops

PEERS = Path(__file__).resolve().parent
CAUSAL_CONV1D = PEERS / "causal_conv1d"
MAMBA_SSM = PEERS / "mamba_ssm"

_impl = {"module": ops}


class BackwardNotProvided(NotImplementedError):
    """A peer test reached a backward pass; minimamba.ops has forward functions only."""


class NoTwin(NotImplementedError):
    """A peer test called a kernel (or a form of one) that minimamba does not implement."""


@contextlib.contextmanager
def use(module):
    """Route the stand-ins to `module` (minimamba.ops or minimamba.kernels.cpu) inside the block."""
    before = _impl["module"]
    _impl["module"] = module
    try:
        yield
    finally:
        _impl["module"] = before


def _fn(name):
    return getattr(_impl["module"], name)


# ---------------------------------------------------------------- torch <-> NumPy


def to_numpy(t):
    """A NumPy view of a CPU tensor (bfloat16 as a float32 copy); None stays None."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def to_numpy_copy(t):
    """A NumPy copy, for arrays the minimamba function updates in place."""
    return np.array(to_numpy(t))


def write_back(dest, array):
    """dest[...] = array, rounded to dest's dtype by torch."""
    dest.copy_(torch.from_numpy(np.ascontiguousarray(array)))


# ---------------------------------------------------------------- causal_conv1d_cuda


def causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, out, final_states_out, silu_activation):
    result = _fn("causal_conv1d_fn")(
        to_numpy(x), to_numpy(weight), to_numpy(bias), seq_idx=to_numpy(seq_idx),
        initial_states=to_numpy(initial_states), return_final_states=final_states_out is not None,
        activation="silu" if silu_activation else None)
    if final_states_out is not None:
        result, final_states = result
        write_back(final_states_out, final_states)
    write_back(out, result)


def causal_conv1d_update(x, conv_state, weight, bias, out, silu_activation, cache_seqlens, conv_state_indices):
    state = to_numpy_copy(conv_state)
    result = _fn("causal_conv1d_update")(
        to_numpy(x), state, to_numpy(weight), to_numpy(bias), activation="silu" if silu_activation else None,
        cache_seqlens=to_numpy(cache_seqlens), conv_state_indices=to_numpy(conv_state_indices))
    write_back(conv_state, state)
    write_back(out, result)


def _no_backward(*args, **kwargs):
    raise BackwardNotProvided("minimamba.ops has no backward pass")


# ---------------------------------------------------------------- selective_scan_cuda


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """mamba_ssm's selective_scan_cuda.fwd: returns (out, x) or (out, x, out_z).

    x holds the kernel's per-chunk states, (b, d, chunks, 2n) with the states at odd
    indices; the callers read only x[:, :, -1, 1::2], the last state, so one chunk is given.
    """
    if A.is_complex():
        raise NoTwin("complex A: minimamba implements the real (Mamba-1) scan only")
    out, last_state = _fn("selective_scan_fn")(
        to_numpy(u), to_numpy(delta), to_numpy(A), to_numpy(B), to_numpy(C), D=to_numpy(D), z=to_numpy(z),
        delta_bias=to_numpy(delta_bias), delta_softplus=delta_softplus, return_last_state=True)
    b, d, n = last_state.shape
    x = torch.zeros(b, d, 1, 2 * n, dtype=torch.from_numpy(last_state).dtype)
    x[:, :, 0, 1::2] = torch.from_numpy(last_state)
    out = torch.from_numpy(np.ascontiguousarray(out)).to(u.dtype)
    if z is None:
        return out, x
    # NOTE: with z the kernel also returns the output before the gate; the callers only save
    # it for the backward, which minimamba does not provide, so None stands in for it.
    return None, x, out


# ---------------------------------------------------------------- mamba_ssm's Triton selective_state_update


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    work = to_numpy_copy(state)
    out = _fn("selective_state_update")(
        work, to_numpy(x), to_numpy(dt), to_numpy(A), to_numpy(B), to_numpy(C), D=to_numpy(D), z=to_numpy(z),
        dt_bias=to_numpy(dt_bias), dt_softplus=dt_softplus, state_batch_indices=to_numpy(state_batch_indices))
    write_back(state, work)
    return torch.from_numpy(np.ascontiguousarray(out)).to(x.dtype)


# ---------------------------------------------------------------- device mapping


def _is_cuda(value):
    return ((isinstance(value, str) and value.startswith("cuda"))
            or (isinstance(value, torch.device) and value.type == "cuda"))


class CudaAsCpu(TorchFunctionMode):
    """Every torch call made inside gets device="cpu" where it asked for "cuda"."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


# ---------------------------------------------------------------- loading the vendored files


def _module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _functions_from(path, names, namespace):
    """Execute only the top-level functions `names` of the vendored file `path` in `namespace`.

    Used where the file also defines Triton kernels, which cannot be imported without
    triton; the reference functions beside them need only torch and einops.
    """
    tree = ast.parse(path.read_text(), str(path))
    body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    missing = set(names) - {node.name for node in body}
    if missing:
        raise ImportError(f"{path} has no function {sorted(missing)}")
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def _load(name, path, package_dir=None):
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=None if package_dir is None else [str(package_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _stand_ins():
    from einops import rearrange, repeat

    torch_names = {"torch": torch, "F": torch.nn.functional, "Tensor": torch.Tensor,
                   "rearrange": rearrange, "repeat": repeat}
    ssu_path = MAMBA_SSM / "mamba_ssm/ops/triton/selective_state_update.py"
    ssu = _module("mamba_ssm.ops.triton.selective_state_update", selective_state_update=selective_state_update,
                  **torch_names)
    _functions_from(ssu_path, ["selective_state_update_ref"], ssu.__dict__)
    varlen = _module("causal_conv1d.causal_conv1d_varlen", causal_conv1d_varlen_states=_no_twin, **torch_names)
    _functions_from(CAUSAL_CONV1D / "causal_conv1d/causal_conv1d_varlen.py", ["causal_conv1d_varlen_states_ref"],
                    varlen.__dict__)
    return {
        "causal_conv1d_cuda": _module("causal_conv1d_cuda", causal_conv1d_fwd=causal_conv1d_fwd,
                                      causal_conv1d_bwd=_no_backward, causal_conv1d_update=causal_conv1d_update),
        "selective_scan_cuda": _module("selective_scan_cuda", fwd=selective_scan_fwd, bwd=_no_backward),
        "causal_conv1d.causal_conv1d_varlen": varlen,
        "mamba_ssm": _module("mamba_ssm", __version__="2.3.2.post1", __path__=[str(MAMBA_SSM / "mamba_ssm")]),
        "mamba_ssm.ops.triton.layer_norm": _module("mamba_ssm.ops.triton.layer_norm", _layer_norm_fwd=_no_twin),
        "mamba_ssm.ops.triton.selective_state_update": ssu,
    }


def _no_twin(*args, **kwargs):
    raise NoTwin("this kernel has no minimamba twin")


_loaded = {}
_packages = {}  # the stand-ins and vendored modules by name, imported once


@contextlib.contextmanager
def _installed():
    """The stand-ins and vendored packages in sys.modules for the duration of some imports only.

    Nothing else in the process (transformers looks for mamba_ssm) ever sees them; the
    imported functions keep what they bound. Everything is imported once per process
    (causal-conv1d registers torch custom ops, which exist once).
    """
    before = set(sys.modules)
    try:
        if _packages:
            sys.modules.update(_packages)
        else:
            sys.modules.update(_stand_ins())
            _load("causal_conv1d", CAUSAL_CONV1D / "causal_conv1d/__init__.py", CAUSAL_CONV1D / "causal_conv1d")
            importlib.import_module("mamba_ssm.ops.selective_scan_interface")
            _packages.update({name: sys.modules[name] for name in set(sys.modules) - before})
        yield
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]


def load_peer_tests(paths):
    """Import the vendored peer test files (and what they import) as modules; returns them by path."""
    todo = [Path(p) for p in paths if str(p) not in _loaded]
    if todo:
        with _installed():
            for path in todo:
                _loaded[str(path)] = _load(f"_peer_{path.parent.name}_{path.stem}", path)
    return {str(p): _loaded[str(p)] for p in paths}


def load_mamba_ssm():
    """mamba_ssm 2.3.2.post1's selective_scan_interface (vendored, unchanged) and the
    selective_state_update module (the stand-in with the vendored reference function)."""
    with _installed():
        pass
    return _packages["mamba_ssm.ops.selective_scan_interface"], _packages["mamba_ssm.ops.triton.selective_state_update"]


def load_causal_conv1d():
    """causal_conv1d 1.7.0's causal_conv1d_interface (vendored, unchanged)."""
    with _installed():
        pass
    return _packages["causal_conv1d.causal_conv1d_interface"]
