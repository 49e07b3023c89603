"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Eq. 3).

A frozen weight W (out, in) gets a trainable low-rank update:

    y = x W^T + (alpha / r) * dropout(x) A^T B^T       A (r, in), B (out, r), B = 0 at the start

and an embedding E (V, d) gets  E[ids] + (alpha / r) * A^T[ids] B^T  with A (r, V), B (d, r)
(no dropout on embeddings, as PEFT). This module holds the adapter arrays, their
forward and hand-derived backward, merging, and reading/writing PEFT's file format.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import CheckpointError, shown


class LoraAdapter:
    """The two factors of one module's update, and how they are applied.

    kind "linear": A (r, in), B (out, r), names lora_A.weight / lora_B.weight.
    kind "embedding": A (r, V), B (d, r), names lora_embedding_A / lora_embedding_B.
    """

    def __init__(self, kind, A, B, alpha, dropout=0.0):
        if kind not in ("linear", "embedding"):
            raise ValueError(f"LoRA kind must be 'linear' or 'embedding', got {kind!r}")
        self.kind = kind
        self.A = A
        self.B = B
        self.r = A.shape[0]
        self.alpha = alpha
        self.dropout = float(dropout)

    @property
    def scale(self):
        return self.alpha / self.r

    def names(self):
        return ("lora_A.weight", "lora_B.weight") if self.kind == "linear" else ("lora_embedding_A", "lora_embedding_B")

    def named_arrays(self):
        a, b = self.names()
        return {a: self.A, b: self.B}

    def delta_weight(self):
        """The update to the base weight, in the base weight's layout: (out, in) or (V, d)."""
        if self.kind == "linear":
            return self.scale * (self.B @ self.A)  # (out, in)
        return self.scale * (self.B @ self.A).T  # (V, d)


def init_adapter(kind, base_shape, r, alpha, dropout, rng, dtype=np.float32):
    """PEFT's default init: A Kaiming-uniform (linear) or normal (embedding), B zero, so the model starts unchanged.

    NOTE: for embeddings PEFT zeroes A and draws B normal instead; either way the product is zero.
    """
    out_dim, in_dim = base_shape
    if kind == "linear":
        bound = math.sqrt(6.0 / ((1 + 5.0) * in_dim))  # kaiming_uniform_(a=sqrt(5)), fan_in = in
        A = rng.uniform(-bound, bound, (r, in_dim)).astype(dtype)
        B = np.zeros((out_dim, r), dtype=dtype)
    else:  # base (V, d): A (r, V) zero, B (d, r) normal
        A = np.zeros((r, out_dim), dtype=dtype)
        B = rng.normal(0.0, 1.0, (in_dim, r)).astype(dtype)
    return LoraAdapter(kind, A, B, alpha, dropout)


# ---------------------------------------------------------------- forward and backward


def lora_linear_forward(x, adapter, rng=None):
    """(alpha/r) * dropout(x) A^T B^T; dropout only when `rng` is given (training)."""
    mask = None
    if rng is not None and adapter.dropout > 0:
        keep = 1.0 - adapter.dropout
        mask = (rng.random(x.shape) < keep).astype(x.dtype) / keep  # inverted dropout, as torch
        x = x * mask
    low = x @ adapter.A.T  # (..., r)
    return adapter.scale * (low @ adapter.B.T), (x, low, mask)  # (..., out)


def lora_linear_backward(dy, saved, adapter):
    """With s = alpha/r, xd = dropout(x), low = xd A^T:
        dB = s dy^T low      dA = s (dy B)^T xd      dx = s (dy B) A, times the dropout mask
    """
    xd, low, mask = saved
    s = adapter.scale
    dlow = s * (dy @ adapter.B)  # (..., r)
    dB = s * dy.reshape(-1, dy.shape[-1]).T @ low.reshape(-1, low.shape[-1])  # (out, r)
    dA = dlow.reshape(-1, dlow.shape[-1]).T @ xd.reshape(-1, xd.shape[-1])  # (r, in)
    dx = dlow @ adapter.A  # (..., in)
    if mask is not None:
        dx = dx * mask
    return dx, {"lora_A.weight": dA, "lora_B.weight": dB}


def lora_embedding_forward(ids, adapter):
    """(alpha/r) * A^T[ids] B^T: rows of A^T are looked up like an embedding."""
    low = adapter.A.T[ids]  # (b, l, r)
    return adapter.scale * (low @ adapter.B.T), (ids, low)  # (b, l, d)


def lora_embedding_backward(dout, saved, adapter):
    """dB = s dout^T low;  dA^T scatter-adds s (dout B) into the rows the ids read."""
    ids, low = saved
    s = adapter.scale
    dout2 = dout.reshape(-1, dout.shape[-1])  # (t, d)
    dB = s * dout2.T @ low.reshape(-1, low.shape[-1])  # (d, r)
    dlow = s * (dout2 @ adapter.B)  # (t, r)
    dAT = np.zeros((adapter.A.shape[1], adapter.r), dtype=dout.dtype)  # (V, r)
    np.add.at(dAT, ids.reshape(-1), dlow)
    return {"lora_embedding_A": dAT.T, "lora_embedding_B": dB}


# ---------------------------------------------------------------- adapters on a model, PEFT's files

PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("x_proj", "embeddings", "in_proj")
# NOTE: PEFT 0.21 refuses out_proj and conv1d on Mamba models (tuners_utils.py,
# _check_lora_target_modules_mamba): mamba_ssm's fused CUDA path reads out_proj.weight
# directly and would skip the adapter. minimamba trains an out_proj adapter correctly,
# but PEFT cannot load such a file; merge it instead (`merge_adapters`).
# NOTE: transformers 5.24's Mamba computes `self.dt_proj.weight @ time_step` instead of
# calling dt_proj, so PEFT's dt_proj adapter is silently skipped in its unmerged forward.
# minimamba applies a dt_proj adapter; merge it before comparing with transformers + PEFT.
SUPPORTED_TARGETS = ("x_proj", "embeddings", "in_proj", "dt_proj", "out_proj")


def target_module_names(config, targets) -> dict:
    """{module name: (kind, base weight name)} for every module whose last name part is in `targets`."""
    targets = list(targets)
    bad = [t for t in targets if t not in SUPPORTED_TARGETS]
    if bad:
        raise ValueError(f"LoRA target {bad[0]!r} is not supported; choose from {', '.join(SUPPORTED_TARGETS)}")
    if not targets:
        raise ValueError("give at least one LoRA target module")
    out = {}
    if "embeddings" in targets:
        out["backbone.embeddings"] = ("embedding", "backbone.embeddings.weight")
    for i in range(config.num_hidden_layers):
        for t in ("in_proj", "x_proj", "dt_proj", "out_proj"):
            if t in targets:
                name = f"backbone.layers.{i}.mixer.{t}"
                out[name] = ("linear", name + ".weight")
    return out


def add_adapters(config, params, targets=DEFAULT_TARGETS, r=8, alpha=16, dropout=0.0, seed=0) -> dict:
    """Fresh adapters {module name: LoraAdapter} on the target modules (the product B A starts at zero)."""
    if r < 1:
        raise ValueError(f"LoRA rank r must be at least 1, got {r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must lie in [0, 1), got {dropout}")
    rng = np.random.default_rng(seed)
    adapters = {}
    for module, (kind, weight_name) in target_module_names(config, targets).items():
        adapters[module] = init_adapter(kind, params[weight_name].shape, r, alpha, dropout, rng,
                                        dtype=params[weight_name].dtype)
    return adapters


def merge_adapters(params: dict, adapters: dict) -> dict:
    """New base weights W + (alpha/r) B A, the state_dict of an ordinary model (inputs are not changed).

    NOTE: with the embeddings adapted and the head tied, the merged embedding is also
    the head, so the merged model's logits differ from the unmerged adapter's (whose
    head keeps the base embedding) — the same as PEFT's merge_and_unload on a tied model.
    """
    merged = dict(params)
    for module, adapter in adapters.items():
        name = module + ".weight"
        merged[name] = (params[name] + adapter.delta_weight()).astype(params[name].dtype)
    return merged


def save_adapter(folder, adapters: dict, base_model_name_or_path=None):
    """adapter_config.json + adapter_model.safetensors, with PEFT's key names and config fields."""
    import os

    from ..atomic import write_json
    from ..weights import write_safetensors

    if not adapters:
        raise ValueError("no adapters to save")
    first = next(iter(adapters.values()))
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    targets = []
    for module, adapter in adapters.items():
        for key, value in adapter.named_arrays().items():
            tensors[f"{PEFT_PREFIX}{module}.{key}"] = np.ascontiguousarray(value, dtype=np.float32)
        short = module.split(".")[-1]
        if short not in targets:
            targets.append(short)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": first.dropout, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
        "auto_mapping": None,
    }
    write_safetensors(os.path.join(folder, "adapter_model.safetensors"), tensors, metadata={"format": "pt"})
    write_json(os.path.join(folder, "adapter_config.json"), config, indent=2)


def load_adapter(folder, config, params, dtype=np.float32) -> dict:
    """Adapters from a PEFT folder (ours or one PEFT saved), checked against the base model's shapes."""
    import os

    from ..errors import read_json_file
    from ..weights import read_safetensors

    cfg_path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: not a PEFT adapter folder")
    r, alpha, dropout = check_adapter_config(read_json_file(cfg_path, "adapter_config.json"), cfg_path)
    tensors = read_safetensors(os.path.join(folder, "adapter_model.safetensors"))
    modules = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for suffix, (kind, part) in {".lora_A.weight": ("linear", "A"), ".lora_B.weight": ("linear", "B"),
                                     ".lora_embedding_A": ("embedding", "A"),
                                     ".lora_embedding_B": ("embedding", "B")}.items():
            if name.endswith(suffix):
                module = name[:-len(suffix)]
                modules.setdefault(module, {"kind": kind})[part] = np.array(value, dtype=dtype)
                break
        else:
            raise CheckpointError(f"{folder}: unexpected tensor {shown(key)} in the adapter")
    adapters = {}
    allowed = target_module_names(config, SUPPORTED_TARGETS)  # {module: (kind, base weight name)}
    for module, parts in modules.items():
        if "A" not in parts or "B" not in parts:
            raise CheckpointError(f"{folder}: module {shown(module)} has only one of its two LoRA factors")
        if module not in allowed or module + ".weight" not in params:
            raise CheckpointError(f"{folder}: adapter for {shown(module)}, which the base model does not have "
                                  "(or minimamba cannot adapt)")
        if parts["kind"] != allowed[module][0]:
            raise CheckpointError(f"{folder}: {module} has {parts['kind']} LoRA factors, which do not fit it")
        weight = params[module + ".weight"]
        A, B = parts["A"], parts["B"]
        base = weight.shape if parts["kind"] == "linear" else weight.shape[::-1]  # embedding: (d, V)
        if A.shape != (r, base[1]) or B.shape != (base[0], r):
            raise CheckpointError(f"{folder}: {module} LoRA factors {A.shape}, {B.shape} do not fit the base weight "
                                  f"{weight.shape} with r={r}")
        if not (np.isfinite(A).all() and np.isfinite(B).all()):
            raise CheckpointError(f"{folder}: {module} LoRA factors hold NaN or infinite values")
        adapters[module] = LoraAdapter(parts["kind"], A, B, alpha, dropout)
    if not adapters:
        raise CheckpointError(f"{folder}: the adapter holds no LoRA factors")
    return adapters


def check_adapter_config(peft_config, cfg_path):
    """(r, alpha, dropout) from a PEFT adapter_config.json, every field checked; faults name the file and field."""
    if not isinstance(peft_config, dict):
        raise CheckpointError(f"{cfg_path}: must hold a JSON object")
    if peft_config.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type is {shown(peft_config.get('peft_type'))}; only LORA adapters load")
    for field in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if peft_config.get(field):
            raise CheckpointError(f"{cfg_path}: {field}=true is not supported")
    if peft_config.get("rank_pattern") or peft_config.get("alpha_pattern"):
        raise CheckpointError(f"{cfg_path}: per-module rank_pattern / alpha_pattern are not supported")
    r, alpha = peft_config.get("r"), peft_config.get("lora_alpha")
    dropout = peft_config.get("lora_dropout") or 0.0
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 1 << 20:
        raise CheckpointError(f"{cfg_path}: r must be a positive integer (the LoRA rank), got {shown(r)}")
    for field, value in (("lora_alpha", alpha), ("lora_dropout", dropout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CheckpointError(f"{cfg_path}: {field} must be a finite number, got {shown(value)}")
    if not 0 <= dropout < 1:
        raise CheckpointError(f"{cfg_path}: lora_dropout must lie in [0, 1), got {dropout} (1 or more would zero "
                              "every LoRA output)")
    targets = peft_config.get("target_modules")
    if targets is not None:
        names = [targets] if isinstance(targets, str) else targets
        if not isinstance(names, list) or not all(isinstance(t, str) for t in names):
            raise CheckpointError(f"{cfg_path}: target_modules must be a list of module names")
        bad = [t for t in names if t not in SUPPORTED_TARGETS]
        if bad:
            raise CheckpointError(f"{cfg_path}: target module {shown(bad[0])} is not supported; "
                                  f"choose from {', '.join(SUPPORTED_TARGETS)}")
    return r, float(alpha), float(dropout)
