"""MambaConfig: every field of transformers' MambaConfig, with its default.

Reads the Hugging Face `config.json` of `state-spaces/mamba-*-hf` and also the
original state-spaces one (`d_model`, `n_layer`, `ssm_cfg`,
`pad_vocab_size_multiple`), and writes the HF form back.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from .errors import CheckpointError, read_json_file, shown

MAX_DIM = 1 << 24  # no dimension of a real Mamba comes near 16.7M (vocabularies are ~50k-256k)
MAX_PARAMETERS = 10**12  # a trillion numbers: beyond any Mamba checkpoint, and any machine's memory


class ConfigError(CheckpointError):
    """A config (or config.json) with a missing, mistyped or impossible field."""


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
            self.time_step_rank = math.ceil(self.hidden_size / 16) if _is_int(self.hidden_size) else None
        for name in ("vocab_size", "hidden_size", "state_size", "num_hidden_layers",
                     "expand", "conv_kernel", "time_step_rank"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"MambaConfig.{name} must be a positive integer, got {shown(value)}")
            if value > MAX_DIM:
                raise ConfigError(f"MambaConfig.{name}={value} is absurdly large (the limit is {MAX_DIM:,})")
        for name in ("use_bias", "use_conv_bias", "residual_in_fp32", "rescale_prenorm_residual", "use_cache",
                     "use_mambapy", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"MambaConfig.{name} must be true or false, got {shown(getattr(self, name))}")
        for name in ("layer_norm_epsilon", "initializer_range", "time_step_scale", "time_step_min",
                     "time_step_max", "time_step_floor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"MambaConfig.{name} must be a finite number, got {shown(value)}")
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(f"MambaConfig.layer_norm_epsilon must be positive, got {self.layer_norm_epsilon}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            if not all(i is None or (_is_int(i) and i >= 0) for i in ids):
                raise ConfigError(f"MambaConfig.{name} must be a token id (an integer >= 0), a list of them or null, "
                                  f"got {shown(value)}")
        if self.hidden_act != "silu":
            raise ConfigError(f"MambaConfig.hidden_act={shown(self.hidden_act)} is not supported (only 'silu')")
        if not isinstance(self.time_step_init_scheme, str):
            raise ConfigError("MambaConfig.time_step_init_scheme must be a string")
        if not isinstance(self.extra, dict):
            raise ConfigError("MambaConfig.extra must be a dict")
        params = self.num_parameters()
        if params > MAX_PARAMETERS:
            raise ConfigError(f"this config describes {params:.3g} parameters, over the limit of "
                              f"{MAX_PARAMETERS:.0e}; check the sizes (vocab_size, hidden_size, num_hidden_layers, ...)")

    def num_parameters(self) -> int:
        """How many numbers the weights hold (Python ints: no overflow for absurd configs)."""
        d, e, n, k, r, v = (self.hidden_size, self.intermediate_size, self.state_size, self.conv_kernel,
                            self.time_step_rank, self.vocab_size)
        per_layer = d + 2 * e * d + e * k + (r + 2 * n) * e + e * r + e + e * n + e + d * e
        if self.use_conv_bias:
            per_layer += e
        if self.use_bias:
            per_layer += 2 * e + d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * per_layer + d

    @property
    def intermediate_size(self) -> int:
        """e: width of the mixer's inner channels."""
        return int(self.expand * self.hidden_size)

    # ------------------------------------------------------------------ I/O

    @classmethod
    def from_dict(cls, d: dict) -> "MambaConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a config must hold a JSON object, got {type(d).__name__}")
        d = dict(d)
        if "d_model" in d:  # original state-spaces layout
            d = _from_state_spaces(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k != "intermediate_size"}
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "MambaConfig":
        """A config.json; a missing file is a FileNotFoundError, anything malformed a ConfigError naming the file."""
        try:
            d = read_json_file(path, "config.json")
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        try:
            return cls.from_dict(d)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

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
        """Write config.json atomically (temp file, fsync, rename)."""
        from .atomic import write_json

        write_json(path, self.to_dict(), indent=2, sort_keys=True)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _from_state_spaces(d: dict) -> dict:
    """Map the original mamba_ssm config.json onto transformers' field names."""
    ssm_cfg = d.get("ssm_cfg") or {}
    if not isinstance(ssm_cfg, dict):
        raise ConfigError(f"ssm_cfg must be an object, got {type(ssm_cfg).__name__}")
    vocab = d.get("vocab_size", 50277)
    multiple = d.get("pad_vocab_size_multiple", 1)
    for name, value in (("vocab_size", vocab), ("pad_vocab_size_multiple", multiple)):
        if not _is_int(value) or not 1 <= value <= MAX_DIM:
            raise ConfigError(f"{name} must be an integer from 1 to {MAX_DIM:,}, got {shown(value)}")
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
        raise ConfigError(f"ssm_cfg.layer={shown(ssm_cfg['layer'])}: only Mamba1 checkpoints are supported")
    return out
