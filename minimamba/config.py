"""MambaConfig: every field of transformers' MambaConfig, with its default.

Reads the Hugging Face `config.json` of `state-spaces/mamba-*-hf` and also the
original state-spaces one (`d_model`, `n_layer`, `ssm_cfg`,
`pad_vocab_size_multiple`), and writes the HF form back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field


@dataclass
class MambaConfig:
    vocab_size: int = 50280  # 50277 GPT-NeoX tokens padded to a multiple of 8
    hidden_size: int = 768  # d: width of the residual stream
    state_size: int = 16  # n: SSM state per channel
    num_hidden_layers: int = 32
    layer_norm_epsilon: float = 1e-5  # RMSNorm eps (the checkpoints use 1e-5)
    pad_token_id: int | None = 0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    expand: int = 2  # e = expand * d
    conv_kernel: int = 4  # k: width of the causal depthwise conv
    use_bias: bool = False  # bias in in_proj and out_proj
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    initializer_range: float = 0.1
    residual_in_fp32: bool = True  # keep the residual stream in float32 (or better)
    time_step_rank: int | str = "auto"  # r: "auto" is ceil(d / 16)
    time_step_scale: float = 1.0
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_init_scheme: str = "random"
    time_step_floor: float = 1e-4
    rescale_prenorm_residual: bool = False
    use_cache: bool = True
    use_mambapy: bool = False
    tie_word_embeddings: bool = True
    # Anything else found in a config.json is kept here and written back unchanged.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        for name in ("vocab_size", "hidden_size", "state_size", "num_hidden_layers",
                     "expand", "conv_kernel", "time_step_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MambaConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"MambaConfig.hidden_act={self.hidden_act!r} is not supported (only 'silu')")

    @property
    def intermediate_size(self) -> int:
        """e: width of the mixer's inner channels."""
        return int(self.expand * self.hidden_size)

    # ------------------------------------------------------------------ I/O

    @classmethod
    def from_dict(cls, d: dict) -> "MambaConfig":
        d = dict(d)
        if "d_model" in d:  # original state-spaces layout
            d = _from_state_spaces(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k != "intermediate_size"}
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "MambaConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(d).__name__}")
        return cls.from_dict(d)

    @classmethod
    def from_pretrained(cls, path_or_repo_id, revision=None, cache_dir=None) -> "MambaConfig":
        from .weights import resolve_model_dir

        folder = resolve_model_dir(path_or_repo_id, revision=revision, cache_dir=cache_dir)
        return cls.from_json(os.path.join(folder, "config.json"))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["intermediate_size"] = self.intermediate_size
        d.update(self.extra)
        d.setdefault("model_type", "mamba")
        d.setdefault("architectures", ["MambaForCausalLM"])
        return d

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


def _from_state_spaces(d: dict) -> dict:
    """Map the original mamba_ssm config.json onto transformers' field names."""
    ssm_cfg = d.get("ssm_cfg") or {}
    vocab = d.get("vocab_size", 50277)
    multiple = d.get("pad_vocab_size_multiple", 1)
    if vocab % multiple:
        vocab += multiple - vocab % multiple  # mamba_ssm pads the embedding this way
    out = {
        "vocab_size": vocab,
        "hidden_size": d["d_model"],
        "num_hidden_layers": d.get("n_layer", 24),
        "state_size": ssm_cfg.get("d_state", 16),
        "conv_kernel": ssm_cfg.get("d_conv", 4),
        "expand": ssm_cfg.get("expand", 2),
        "time_step_rank": ssm_cfg.get("dt_rank", "auto"),
        "use_bias": ssm_cfg.get("bias", False),
        "use_conv_bias": ssm_cfg.get("conv_bias", True),
        "residual_in_fp32": d.get("residual_in_fp32", True),
        "tie_word_embeddings": d.get("tie_embeddings", True),
    }
    if ssm_cfg.get("layer", "Mamba1") not in ("Mamba1", None):
        raise ValueError(f"ssm_cfg.layer={ssm_cfg['layer']!r}: only Mamba1 checkpoints are supported")
    return out
