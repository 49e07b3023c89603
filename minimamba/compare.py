"""Compare two records name by name and name the first tensor that diverges.

    from minimamba.compare import compare
    result = compare("ref.safetensors", "mine.safetensors")   # or two {name: array} dicts
    print(result.report())                                      # one row per tensor, forward order
    result.first_divergence                                     # the earliest name beyond tolerance, or None

A record file is a safetensors file of {name: array} (names from minimamba.record's
table) whose metadata holds the input ids, the dtype, the model, and the error
envelope. `minimamba dump` writes one; a kernel author's own framework can write
one too (any subset of the names, any layout-compatible arrays).

The tolerance. With --rtol/--atol a tensor passes when every element has
|mine - ref| <= atol + rtol |ref| (numpy.isclose). Otherwise it is the float32
error envelope: for each tensor, how far minimamba's own float32 run lies from
its float64 run on the same input (max abs difference, measured by `dump` and
stored in the file), times ENVELOPE_FACTOR, plus float32's eps times max |ref|
(so that a tensor both runs compute exactly, like the embeddings, still allows
one rounding). "Within the envelope" then means: as far from the float64 truth
as a correct float32 implementation may be. The factor leaves room for a
different but correct order of summation: transformers' float32 forward on the
130m shape (random weights, 64 tokens) lies within 1.4x of minimamba's envelope on
every tensor it hooks (err/tol <= 0.14; docs/compare_transformers_130m.txt), so
ENVELOPE_FACTOR = 10 does not flag a correct implementation, while a scan that reads
its input as float16 (README's worked example) shows as ~60 times the tolerance.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from .record import LAYER_NAME

ENVELOPE_FACTOR = 10.0  # tolerance = factor x (float32 - float64 of minimamba) + eps32 x max|ref|; see above
EPS32 = float(np.finfo(np.float32).eps)
# forward order of the names inside one layer (minimamba.record's table)
LAYER_ORDER = ("norm", "mixer.in_proj", "mixer.conv_act", "mixer.x_proj", "mixer.dt_proj", "mixer.dt_softplus",
               "mixer.B", "mixer.C", "mixer.scan", "mixer.gated", "mixer.out_proj", "mixer.conv_state",
               "mixer.ssm_state", "")


class RecordFileError(ValueError):
    """A record file that cannot be compared: missing, not safetensors, or mismatched (exit code 2)."""


def forward_order(names) -> list:
    """Names sorted as the forward pass makes them: embeddings, layer by layer, norm_f, lm_head, then others."""
    def key(name):
        if name == "backbone.embeddings":
            return (0, 0, 0, name)
        match = LAYER_NAME.match(name)
        if match:
            short = match.group(2) or ""
            pos = LAYER_ORDER.index(short) if short in LAYER_ORDER else len(LAYER_ORDER)
            return (1, int(match.group(1)), pos, name)
        return (2, 0, {"backbone.norm_f": 0, "lm_head": 1}.get(name, 2), name)

    return sorted(names, key=key)


def layer_of(name):
    match = LAYER_NAME.match(name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------- record files


def save_record(path, record: dict, metadata: dict | None = None):
    """Write {name: array} and JSON-able metadata to a safetensors file (temp file + fsync + rename)."""
    from .weights import write_safetensors

    arrays = {name: np.ascontiguousarray(_to_numpy(value)) for name, value in record.items()}
    meta = {"format": "minimamba.record", **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    write_safetensors(path, arrays, metadata=meta)


def load_record(path):
    """({name: array}, metadata dict) of a record file; RecordFileError with the reason when it cannot be read."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise RecordFileError(f"{path}: no such file")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            record = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # a hostile or truncated file: say which, not what it holds
        raise RecordFileError(f"{path}: not a readable safetensors file ({type(err).__name__})") from None
    metadata = {}
    for key, value in meta.items():
        try:
            metadata[key] = json.loads(value)
        except ValueError:
            metadata[key] = value
    return record, metadata


def _to_numpy(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, dict) else np.asarray(a)


# ---------------------------------------------------------------- the error envelope


def error_envelope(model, input_ids, record="*", record_layers=None, impl=None, float64_record=None) -> dict:
    """{name: max |float32 - float64|} of minimamba's own two runs of `model`'s weights on `input_ids`.

    `model` is a MambaForCausalLM (any dtype); it is rebuilt in float32 and float64 from its weights.
    `float64_record`: the float64 run's record when the caller has just made it (same weights,
    input, names and impl), so it is not run a second time.
    """
    from .model import MambaForCausalLM

    state = {k: model.backend.to_numpy(v) for k, v in model.state_dict().items()}
    runs = {} if float64_record is None else {"float64": float64_record}
    for dtype in ("float32", "float64"):
        if dtype in runs:
            continue
        twin = MambaForCausalLM(model.config, dtype=dtype, impl=impl, init=False).load_state_dict(state)
        runs[dtype] = twin(input_ids, record=record, record_layers=record_layers).record
    return {name: float(np.abs(runs["float32"][name].astype(np.float64) - runs["float64"][name]).max())
            for name in runs["float64"]}


# ---------------------------------------------------------------- comparing


@dataclass
class Row:
    name: str
    shape: tuple
    max_abs: float
    max_rel: float  # max |mine - ref| / max |ref|
    worst: tuple  # index of the element with the largest |mine - ref|
    ratio: float  # error / tolerance: <= 1 passes
    ok: bool


@dataclass
class Comparison:
    rows: list
    tolerance: str  # how the tolerance was set, for the report
    only_ref: list = field(default_factory=list)
    only_mine: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def first_divergence(self):
        return next((r.name for r in self.rows if not r.ok), None)

    def report(self) -> str:
        width = max(len(r.name) for r in self.rows)
        lines = [f"tolerance: {self.tolerance}",
                 f"{'name':{width}s}  {'max abs':>9s}  {'max rel':>9s}  {'err/tol':>9s}  worst at        verdict"]
        for r in self.rows:
            lines.append(f"{r.name:{width}s}  {r.max_abs:9.2e}  {r.max_rel:9.2e}  {r.ratio:9.2e}  "
                         f"{str(r.worst):15s} {'ok' if r.ok else 'BEYOND'}")
        for label, names in (("only in the reference", self.only_ref), ("only in mine", self.only_mine)):
            if names:
                lines.append(f"{label} (not compared): {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}")
        first = self.first_divergence
        if first is None:
            lines.append(f"first divergence: none ({len(self.rows)} tensors within tolerance)")
        else:
            r = self.rows[[row.name for row in self.rows].index(first)]
            lines.append(f"first divergence: {first} (max abs {r.max_abs:.2e} at {r.worst}, "
                         f"{r.ratio:.3g}x the tolerance)")
        return "\n".join(lines)

    def plot(self, path):
        """Error over tolerance per layer, one line per kind of tensor (log scale); written to `path`."""
        try:  # a Figure of its own, not pyplot: the caller's matplotlib backend and figures stay as they are
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("--plot draws with matplotlib: pip install matplotlib "
                              "(or pip install -e '.[tutorials]' in the repository)") from None

        fig = Figure(figsize=(7, 4), dpi=100)
        ax = fig.subplots()
        kinds = {}
        for r in self.rows:
            layer = layer_of(r.name)
            if layer is not None:
                short = LAYER_NAME.match(r.name).group(2) or "block output"
                kinds.setdefault(short, []).append((layer, max(r.ratio, 1e-12)))
        for short, points in kinds.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker=".", label=short)
        ax.axhline(1.0, color="k", linestyle="--", linewidth=1, label="tolerance")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("max abs error / tolerance")
        ax.set_title(f"first divergence: {self.first_divergence or 'none'}", fontsize=9)
        ax.legend(fontsize=6, ncol=3)
        fig.tight_layout()
        fig.savefig(path)


def compare(ref, mine, rtol=None, atol=None, envelope=None, factor=ENVELOPE_FACTOR) -> Comparison:
    """Compare two records (paths of record files, or {name: array} dicts), name by name in forward order.

    The tolerance is rtol/atol when either is given, else the error envelope: `envelope`
    ({name: max abs}), or the one stored in the reference's file, or in mine's.
    Raises RecordFileError (a usage error) for an unreadable file, no common names or a shape mismatch.
    """
    ref, ref_meta = _as_record(ref)
    mine, mine_meta = _as_record(mine)
    common = forward_order(set(ref) & set(mine))
    if not common:
        raise RecordFileError(f"the two records have no tensor name in common (reference: "
                              f"{', '.join(forward_order(ref)[:3]) or 'empty'}; mine: "
                              f"{', '.join(forward_order(mine)[:3]) or 'empty'})")
    for name in common:
        if tuple(ref[name].shape) != tuple(mine[name].shape):
            raise RecordFileError(f"{name} has shape {tuple(mine[name].shape)} in mine but "
                                  f"{tuple(ref[name].shape)} in the reference")
    if rtol is not None or atol is not None:
        rtol, atol = rtol or 0.0, atol or 0.0
        tolerance = f"|mine - ref| <= {atol:g} + {rtol:g} |ref| elementwise (--rtol/--atol)"
    else:
        envelope = envelope or ref_meta.get("envelope") or mine_meta.get("envelope")
        if not envelope:
            raise RecordFileError("no tolerance: neither record holds an error envelope (write the reference "
                                  "with `minimamba dump`) and no --rtol/--atol was given")
        missing = [n for n in common if n not in envelope]
        if missing:
            raise RecordFileError(f"the error envelope has no entry for {missing[0]} (dump the reference with "
                                  "the same --names/--layers), or give --rtol/--atol")
        tolerance = (f"{factor:g} x the float32 error envelope (minimamba float32 vs float64, per tensor) "
                     f"+ eps32 x max|ref|")
    rows = []
    for name in common:
        r = ref[name].astype(np.float64)
        m = mine[name].astype(np.float64)
        diff = np.abs(m - r)
        diff = np.where(np.isnan(diff), np.inf, diff)  # a NaN is an error of any size
        worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape)) if diff.size else ()
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(r).max()) if r.size else 0.0
        if rtol is not None:
            bound = atol + rtol * np.abs(r)
            ratio = float((diff / np.where(bound > 0, bound, np.finfo(np.float64).tiny)).max()) if diff.size else 0.0
        else:
            tol = factor * float(envelope[name]) + EPS32 * scale
            ratio = max_abs / tol if tol > 0 else (0.0 if max_abs == 0 else np.inf)
        rows.append(Row(name, tuple(r.shape), max_abs, max_abs / scale if scale > 0 else max_abs, worst,
                        ratio, ratio <= 1.0))
    return Comparison(rows, tolerance, only_ref=forward_order(set(ref) - set(mine)),
                      only_mine=forward_order(set(mine) - set(ref)))


def _as_record(x):
    if isinstance(x, (str, os.PathLike)):
        return load_record(os.fspath(x))
    return {k: _to_numpy(v) for k, v in x.items()}, {}
