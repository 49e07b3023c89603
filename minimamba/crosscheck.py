"""transformers' intermediates under minimamba's record names (needs the `crosscheck` extra: torch, transformers).

    from minimamba.crosscheck import capture_transformers, to_transformers
    hf = to_transformers(model)                         # transformers' MambaForCausalLM, same weights
    out, record = capture_transformers(hf, input_ids)   # record: {name: numpy array}, forward order

Each entry is what a PyTorch forward hook on that module returns, so it can be
compared name by name with `model(input_ids, record=True).record` (the names of
minimamba.record's table marked "hook"; the others have no module whose hook
fires in transformers, and are simply absent here). torch is imported only when
these functions are called.
"""

from __future__ import annotations

import numpy as np

from .compare import forward_order
from .record import Recorder

LAYER_MODULES = ("norm", "mixer.in_proj", "mixer.x_proj", "mixer.dt_proj", "mixer.out_proj", "")


def hooked_names(num_hidden_layers) -> list:
    """The module paths whose outputs the capture asks for, in forward order."""
    names = ["backbone.embeddings"]
    for i in range(num_hidden_layers):
        names += [f"backbone.layers.{i}.{m}" if m else f"backbone.layers.{i}" for m in LAYER_MODULES]
    return names + ["backbone.norm_f", "lm_head"]


def capture_transformers(hf_model, input_ids, names=None, layers=None, **forward_kwargs):
    """(transformers' output, {name: numpy array}) of one forward with hooks on the named modules.

    `names` and `layers` select as `record=` and `record_layers=` do (the same Recorder rule):
    None (all of hooked_names) or fnmatch patterns, and None or the layer indices.
    `forward_kwargs` go to the forward (e.g. cache=..., use_cache=True for a decode step).
    A module whose hook does not fire (dt_proj in transformers 5.24) is left out.
    """
    import torch

    wanted = Recorder(names, layers)
    modules = dict(hf_model.named_modules())
    record, handles = {}, []

    def keep(name):
        def hook(module, args, output):
            if name in record:
                raise RuntimeError(f"transformers called {name} twice in one forward; its hook output is ambiguous")
            record[name] = output.detach().cpu().numpy()
        return hook

    for name in hooked_names(hf_model.config.num_hidden_layers):
        if name in modules and wanted.wants(name):
            handles.append(modules[name].register_forward_hook(keep(name)))
    try:
        with torch.no_grad():
            out = hf_model(input_ids=torch.as_tensor(np.asarray(input_ids)), **forward_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return out, {name: record[name] for name in forward_order(record)}


def to_transformers(model, dtype="float32"):
    """transformers' MambaForCausalLM holding `model`'s weights (eval mode), in `dtype`."""
    import torch
    import transformers

    fields = {k: v for k, v in vars(model.config).items() if not k.startswith("_")}
    config = transformers.MambaConfig(**fields)
    hf = transformers.MambaForCausalLM(config).to(getattr(torch, dtype)).eval()  # load_state_dict casts to this
    state = {k: torch.from_numpy(np.ascontiguousarray(model.backend.to_numpy(v), dtype=dtype))
             for k, v in model.state_dict().items()}  # in `dtype` from the start: a float64 model loses nothing
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["backbone.embeddings.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ValueError(f"weights do not fit transformers' model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf
