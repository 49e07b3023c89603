"""LoRA adapters on a loaded model, unmerged (as PEFT runs them) or merged on request.

    model = MambaForCausalLM.from_pretrained("my-mamba")
    model.load_adapter("sonnet-lora")                 # transformers' name; unmerged
    model = MambaForCausalLM.from_pretrained("sonnet-lora")   # follows base_model_name_or_path, as AutoPeftModel

Unmerged, each adapted weight becomes an object the model's forward already knows
how to use (see `ops.linear`): a projection's `.linear(x)` adds the low-rank update,
x W^T + (alpha / r) (x A^T) B^T, and the embedding's `[ids]` adds (alpha / r) A^T[ids] B^T.
The tied head multiplies by the *base* embedding, as in PEFT's unmerged forward
(the head is its own module there, which the embedding's adapter does not reach).
Merging (`merge=True`) writes W + (alpha / r) B A into the weights instead: faster,
but with the embedding adapted and the head tied, the head changes too (PEFT's
merge_and_unload does the same). The files are read by
`minimamba.training.lora.load_adapter`, which checks every shape against the model.
"""

from __future__ import annotations

import json
import os

from .ops import linear

ADAPTER_CONFIG = "adapter_config.json"


class _Adapted:
    """A base weight with an unmerged LoRA update (A (r, in), B (out, r) already in the model's backend)."""

    def __init__(self, base, A, B, scale):
        self.base, self.A, self.B, self.scale = base, A, B, scale

    shape = property(lambda self: self.base.shape)
    dtype = property(lambda self: self.base.dtype)

    def __array__(self, *args, **kwargs):
        raise TypeError("this weight carries an unmerged LoRA adapter; use its .base, or load the adapter "
                        "with merge=True to get plain arrays")


class LoraLinearWeight(_Adapted):
    """W (out, in) + (alpha / r) B A, applied as two thin matmuls (never formed)."""

    def linear(self, x):  # x (..., in) -> (..., out)
        return linear(x, self.base) + self.scale * ((x @ self.A.T) @ self.B.T)  # (..., r) then (..., out)


class LoraEmbeddingWeight(_Adapted):
    """E (V, d) + (alpha / r) (B A)^T for the lookup; the tied head reads E alone (PEFT's unmerged forward)."""

    def __getitem__(self, ids):  # (b, l) -> (b, l, d)
        return self.base[ids] + self.scale * (self.A.T[ids] @ self.B.T)  # A^T[ids]: (b, l, r)

    def linear(self, x):  # the tied head: x (..., d) -> (..., V)
        return linear(x, self.base)


def is_adapter_folder(folder) -> bool:
    return os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)) and not os.path.isfile(
        os.path.join(folder, "config.json"))


def base_model_of(folder) -> str:
    """The adapter's base_model_name_or_path (a relative folder is taken from the adapter's parent)."""
    with open(os.path.join(folder, ADAPTER_CONFIG), encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{os.path.join(folder, ADAPTER_CONFIG)} names no base_model_name_or_path; load the "
                         "base model, then model.load_adapter(folder)")
    beside = os.path.join(os.path.dirname(os.path.abspath(folder)), base)
    return base if os.path.isdir(base) or not os.path.isdir(beside) else beside


def load_adapter(model, folder, merge=False):
    """Apply the PEFT LoRA adapter in `folder` to `model` (a MambaForCausalLM), unmerged unless `merge`."""
    from .training.lora import load_adapter as read_adapter, merge_adapters
    from .weights import resolve_model_dir

    folder = resolve_model_dir(folder)
    params = model.state_dict()
    if any(isinstance(w, _Adapted) for w in params.values()):
        raise ValueError("this model already carries an unmerged adapter; load the base model again for another")
    adapters = read_adapter(folder, model.config, params, dtype=model.dtype)  # shapes checked against params
    if merge:
        adapted = {m + ".weight": model.backend.to_numpy(params[m + ".weight"]) for m in adapters}
        merged = merge_adapters(adapted, adapters)  # W + (alpha / r) B A
    for module, adapter in adapters.items():
        obj, attr = model._slot(module + ".weight")
        if merge:
            setattr(obj, attr, model.backend.asarray(merged[module + ".weight"], dtype=model.dtype))
            continue
        kind = LoraLinearWeight if adapter.kind == "linear" else LoraEmbeddingWeight
        A, B = (model.backend.asarray(m, dtype=model.dtype) for m in (adapter.A, adapter.B))
        setattr(obj, attr, kind(getattr(obj, attr), A, B, adapter.scale))
    model.adapter_folder = folder
    return model
