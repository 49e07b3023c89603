"""The Mamba language model in NumPy, read top to bottom.

Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"
(2023), https://arxiv.org/abs/2312.00752; the names and numerics follow
transformers' `models/mamba/modeling_mamba.py` so checkpoints load unchanged.

Glossary of dimensions (paper symbols in brackets):
    b  batch size                       l  sequence length (L)
    d  hidden_size, the residual width  e  intermediate_size = expand * d (ED)
    n  state_size (N)                   k  conv_kernel
    r  time_step_rank (rank of Delta)   V  vocab_size

One forward pass:
    input_ids (b, l) -> embeddings (b, l, d)
    -> num_hidden_layers x MambaBlock: h + mixer(rmsnorm(h))
    -> norm_f -> lm_head (tied to the embeddings) -> logits (b, l, V)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .backend import get_backend, resolve_dtype
from .cache import MambaCache, cache_in_use
from .config import MambaConfig
from .impl import resolve_impl
from .ops import array_module, linear, softplus
from .record import NOT_RECORDING, Recorder
from .weights import expected_shapes, load_state_dict, resolve_model_dir


@dataclass
class MambaOutput:
    last_hidden_state: object = None  # (b, l, d)
    cache_params: MambaCache | None = None
    hidden_states: tuple | None = None  # each layer's output, then norm_f's: num_hidden_layers + 1 of (b, l, d)
    record: dict | None = None  # {name: array} of the intermediates asked for by record=, see minimamba.record


@dataclass
class MambaCausalLMOutput:
    loss: object = None  # scalar
    logits: object = None  # (b, l, V)
    cache_params: MambaCache | None = None
    hidden_states: tuple | None = None
    record: dict | None = None


class KernelSlot:
    """The one kernel set of a model, held by reference by the model, its backbone and every mixer.

    `impl` is what the caller asked for (a name, None for "auto", or a mapping of functions);
    it is kept so that `.to()` resolves the same choice again for a new backend.
    """

    def __init__(self, impl, backend_name):
        self.impl, self.kernels = impl, resolve_impl(impl, backend_name)


class MambaMixer:
    """The selective SSM block of Figure 3 (right): gated, with a causal conv and a scan.

    `selective` (default True) is the paper's ablation switch (Section 4.1, Table 1):
    set it to False and x_proj is applied to a vector of ones instead of x, so dt, B and
    C no longer depend on the input: they are learned constants, and the layer is
    time-invariant like S4 (still with a gate and a conv). Training follows it
    (`TrainingModel(..., selective=False)` or the model's mixers' attribute).
    """

    def __init__(self, config: MambaConfig, layer_idx: int, slot: KernelSlot):
        self.config = config
        self.layer_idx = layer_idx
        self.name = f"backbone.layers.{layer_idx}.mixer"  # transformers' module path, for the record
        self.selective = True
        self._kernel_slot = slot  # the model's kernel set (selective_scan_fn & co, see minimamba.impl)
        self.in_proj_weight = self.in_proj_bias = None  # (2e, d), (2e,)
        self.conv1d_weight = self.conv1d_bias = None  # (e, 1, k), (e,)
        self.x_proj_weight = None  # (r + 2n, e)
        self.dt_proj_weight = self.dt_proj_bias = None  # (e, r), (e,)
        self.A_log = None  # (e, n)
        self.D = None  # (e,)
        self.out_proj_weight = self.out_proj_bias = None  # (d, e), (d,)

    @property
    def kernels(self):
        return self._kernel_slot.kernels

    @property
    def A(self):
        # A = -exp(A_log): negative real, so exp(dt A) < 1 decays the state. Recomputed at every
        # call, never cached: an in-place edit of A_log (an optimiser step, a probe) always counts.
        # It costs one (e, n) exp per layer per step (README, "Checking your own implementation").
        return -array_module(self.A_log).exp(self.A_log)  # (e, n)

    def __call__(self, hidden_states, cache_params=None, attention_mask=None, record=None):
        """hidden_states (b, l, d) -> (b, l, d). Reads and updates `cache_params` when given.

        `record`: a minimamba.record.Recorder that keeps this mixer's intermediates (None: none).
        """
        cfg, k, rec, name = self.config, self.kernels, record or NOT_RECORDING, self.name
        e, n, r = cfg.intermediate_size, cfg.state_size, cfg.time_step_rank
        l = hidden_states.shape[1]

        # 1. Input projection, split into the SSM branch x and the gate z (x first).
        xz = linear(hidden_states, self.in_proj_weight, self.in_proj_bias)  # (b, l, 2e)
        rec.put(name, "in_proj", xz)
        x = xz[..., :e].transpose(0, 2, 1)  # (b, e, l): the kernels' layout
        z = xz[..., e:].transpose(0, 2, 1)  # (b, e, l)

        # 2. Causal depthwise conv + SiLU. Padding positions are zeroed before and
        #    after, so a left-padded row's state stays exactly zero until its first token.
        if attention_mask is not None:
            x = x * attention_mask[:, None, :]
        conv_weight = self.conv1d_weight[:, 0, :]  # (e, k)
        if cache_params is None:
            x = k.causal_conv1d_fn(x, conv_weight, self.conv1d_bias, activation="silu")  # (b, e, l)
        else:  # the cached inputs stand in for the zero padding; the state is updated in place
            conv_state = cache_params.conv_states[self.layer_idx]  # (b, e, k)
            x = k.causal_conv1d_update(x, conv_state, conv_weight, self.conv1d_bias, activation="silu")
        if attention_mask is not None:
            x = x * attention_mask[:, None, :]
        rec.put(name, "conv_act", x.transpose(0, 2, 1))

        # 3. The selection mechanism (Algorithm 2): Delta, B, C are functions of the input
        #    (unless selective is off: then of a vector of ones, i.e. learned constants).
        x_sel = x.transpose(0, 2, 1) if self.selective else array_module(x).ones_like(x.transpose(0, 2, 1))
        x_dbl = linear(x_sel, self.x_proj_weight)  # (b, l, r + 2n)
        dt, B, C = x_dbl[..., :r], x_dbl[..., r:r + n], x_dbl[..., r + n:]  # (b, l, r), (b, l, n), (b, l, n)
        dt = linear(dt, self.dt_proj_weight)  # (b, l, e); its bias is added inside the softplus
        A = self.A  # (e, n) = -exp(A_log)
        rec.put(name, "x_proj", x_dbl)
        rec.put(name, "dt_proj", lambda: dt + self.dt_proj_bias)
        rec.put(name, "dt_softplus", lambda: softplus(dt + self.dt_proj_bias))
        rec.put(name, "B", B)
        rec.put(name, "C", C)

        # 4. Selective scan: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t;  y_t = C_t . h_t + D x_t;  y * silu(z)
        if cache_params is not None and l == 1:  # decode: one step of the recurrence
            ssm_state = cache_params.ssm_states[self.layer_idx]  # (b, e, n), updated in place
            step = dict(D=self.D, dt_bias=self.dt_proj_bias, dt_softplus=True)
            rec.put(name, "scan", lambda: k.selective_state_update(  # ungated, on a copy of the state
                ssm_state.copy(), x[:, :, 0], dt[:, 0], A, B[:, 0], C[:, 0], **step)[:, None, :])
            y = k.selective_state_update(ssm_state, x[:, :, 0], dt[:, 0], A, B[:, 0], C[:, 0],
                                         z=z[:, :, 0], **step)
            y = y[:, :, None]  # (b, e, 1)
        else:
            initial_state = None if cache_params is None else cache_params.ssm_states[self.layer_idx]
            scan = dict(D=self.D, delta_bias=self.dt_proj_bias, delta_softplus=True, initial_state=initial_state)
            args = (x, dt.transpose(0, 2, 1), A, B.transpose(0, 2, 1), C.transpose(0, 2, 1))
            rec.put(name, "scan", lambda: k.selective_scan_fn(*args, **scan).transpose(0, 2, 1))  # ungated
            y, last_state = k.selective_scan_fn(*args, z=z, return_last_state=True, **scan)  # (b, e, l), (b, e, n)
            if cache_params is not None:
                cache_params.update_ssm_state(self.layer_idx, last_state)
        rec.put(name, "gated", y.transpose(0, 2, 1))

        # 5. Output projection back to the residual width.
        out = linear(y.transpose(0, 2, 1), self.out_proj_weight, self.out_proj_bias)  # (b, l, d)
        rec.put(name, "out_proj", out)
        if cache_params is not None:  # the states the next call continues from (copies: the cache moves on)
            rec.put(name, "conv_state", lambda: cache_params.conv_states[self.layer_idx].copy())
            rec.put(name, "ssm_state", lambda: cache_params.ssm_states[self.layer_idx].copy())
        return out


class MambaBlock:
    """Pre-norm residual block: h + mixer(rmsnorm(h))."""

    def __init__(self, config: MambaConfig, layer_idx: int, slot: KernelSlot):
        self.config = config
        self.name = f"backbone.layers.{layer_idx}"
        self.norm_weight = None  # (d,)
        self.mixer = MambaMixer(config, layer_idx, slot)

    @property
    def kernels(self):
        return self.mixer.kernels

    def __call__(self, hidden_states, cache_params=None, attention_mask=None, record=None):
        # NOTE: the residual stream is float32 or float64 here, so residual_in_fp32 always holds.
        rec = record or NOT_RECORDING
        normed = self.kernels.rms_norm(hidden_states, self.norm_weight, self.config.layer_norm_epsilon)  # (b, l, d)
        rec.put(self.name, "norm", normed)
        out = hidden_states + self.mixer(normed, cache_params, attention_mask, record)  # (b, l, d)
        rec.put(self.name, "", out)
        return out


class _Pretrained:
    """Loading, saving, moving and naming weights; shared by MambaModel and MambaForCausalLM."""

    prefix = ""  # how this class's parameter names sit inside a MambaForCausalLM checkpoint

    def _setup(self, config, dtype, backend):
        self.config = config
        self.dtype = resolve_dtype(dtype)
        self.backend = get_backend(backend)

    @property
    def kernels(self):
        """selective_scan_fn & co (see minimamba.impl), one set shared with every mixer."""
        return self._kernel_slot.kernels

    @kernels.setter
    def kernels(self, kernels):
        self._kernel_slot.kernels = kernels

    @classmethod
    def from_pretrained(cls, path_or_repo_id, dtype="float32", backend="numpy", impl=None,
                        revision=None, cache_dir=None, allow_non_finite=False, quantization=None):
        """Load a checkpoint folder or Hub repo (e.g. "state-spaces/mamba-130m-hf"), "builtin", or a .gguf file.

        A PEFT adapter folder loads its base_model_name_or_path with the adapter on top, unmerged
        (as PEFT's AutoPeftModel); see `load_adapter`. NaN or infinite weights are refused, naming
        the tensor, unless `allow_non_finite=True`. quantization: "int8" / "int4" quantizes the
        weights as they load (minimamba.quant); a folder saved quantized (its config.json has
        quantization_config) loads packed as it is.
        """
        from .adapters import base_model_of, is_adapter_folder

        if str(path_or_repo_id).endswith(".gguf"):  # llama.cpp's file: quantized tensors stay quantized
            from .gguf import from_gguf
            return from_gguf(cls, path_or_repo_id, dtype=dtype, backend=backend, impl=impl, quantization=quantization)
        folder = resolve_model_dir(path_or_repo_id, revision=revision, cache_dir=cache_dir)
        if is_adapter_folder(folder) and hasattr(cls, "load_adapter"):
            model = cls.from_pretrained(base_model_of(folder), dtype=dtype, backend=backend, impl=impl,
                                        allow_non_finite=allow_non_finite, quantization=quantization)
            return model.load_adapter(folder)
        config = MambaConfig.from_pretrained(folder)
        if "quantization_config" in config.extra:  # saved quantized: the packed weights load as they are
            from .quant import from_pretrained_quantized
            return from_pretrained_quantized(cls, folder, config, dtype, backend, impl, quantization,
                                             allow_non_finite)
        state_dict = load_state_dict(folder, config, allow_non_finite=allow_non_finite)
        model = cls(config, dtype=dtype, backend=backend, impl=impl, init=False)
        model.load_state_dict({name[len(cls.prefix):]: value for name, value in state_dict.items()
                               if name.startswith(cls.prefix)})
        if quantization is not None:  # "int8" / "int4" / a dict: quantized as it loads (minimamba.quant)
            from .quant import quantize_as_asked
            model = quantize_as_asked(model, quantization)
        model.name_or_path = str(path_or_repo_id)
        model.folder = folder
        return model

    @property
    def device(self) -> str:  # transformers' name, for `inputs.to(model.device)`
        return "cpu" if self.backend.name == "numpy" else "cuda"

    def parameter_shapes(self) -> dict:
        return {name[len(self.prefix):]: shape for name, shape in expected_shapes(self.config).items()
                if name.startswith(self.prefix)}

    def _slot(self, name):
        """'backbone.layers.3.mixer.in_proj.weight' -> (that mixer, 'in_proj_weight')."""
        obj, parts = self, name.split(".")
        while parts[0] in ("backbone", "layers", "mixer") or parts[0].isdigit():
            part = parts.pop(0)
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        return obj, "_".join(parts)

    def state_dict(self) -> dict:
        """Parameters by their transformers names (the model's own arrays, not copies)."""
        out = {}
        for name in self.parameter_shapes():
            obj, attr = self._slot(name)
            out[name] = getattr(obj, attr)
        return out

    def load_state_dict(self, state_dict: dict):
        """Set every parameter from `state_dict` (checked names and shapes), in the model's dtype and backend."""
        shapes = self.parameter_shapes()
        missing = sorted(set(shapes) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(shapes))
        if missing or unexpected:
            raise ValueError(f"state_dict does not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, value in state_dict.items():
            if tuple(value.shape) != shapes[name]:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, the config implies {shapes[name]}")
            obj, attr = self._slot(name)
            setattr(obj, attr, self.backend.asarray(value, dtype=self.dtype))
        return self

    def to(self, backend=None, dtype=None, impl=None):
        """Move the weights to another backend ("numpy" / "cupy") and/or dtype; the impl stays unless named."""
        state = {name: self.backend.to_numpy(value) for name, value in self.state_dict().items()}
        old_backend = self.backend.name
        self._setup(self.config, dtype or self.dtype, backend or self.backend.name)
        if impl is not None or self.backend.name != old_backend:  # else the kernels in use stay, assigned ones too
            slot = self._kernel_slot
            slot.impl = slot.impl if impl is None else impl
            slot.kernels = resolve_impl(slot.impl, self.backend.name)
        return self.load_state_dict(state)

    def save_pretrained(self, folder):
        """config.json + model.safetensors (float32 or float64), loadable by transformers."""
        from .weights import save_pretrained

        if getattr(self, "quantization_config", None):  # packed weights + scales: minimamba.quant
            from .quant import save_quantized
            return save_quantized(self, folder)

        state = {self.prefix + name: self.backend.to_numpy(v) for name, v in self.state_dict().items()}
        save_pretrained(folder, self.config, state)

    def num_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.parameter_shapes().values())


class MambaModel(_Pretrained):
    """Embeddings, the stack of blocks and the final RMSNorm (no head)."""

    prefix = "backbone."
    prefill_chunk_size = 2048  # longer inputs run in chunks of this many tokens (None: one pass)

    def __init__(self, config: MambaConfig, dtype="float32", backend="numpy", impl=None, init=True, seed=0):
        self._setup(config, dtype, backend)
        self._kernel_slot = KernelSlot(impl, self.backend.name)
        self.embeddings_weight = None  # (V, d)
        self.layers = [MambaBlock(config, i, self._kernel_slot) for i in range(config.num_hidden_layers)]
        self.norm_f_weight = None  # (d,)
        if init:
            self.load_state_dict({name[len(self.prefix):]: v for name, v in init_weights(config, seed).items()
                                  if name.startswith(self.prefix)})

    def __call__(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache_params=None,
                 use_cache=False, output_hidden_states=False, record=False, record_layers=None):
        """`record`: True, a name pattern or a list of them (see minimamba.record); `.record` then holds them."""
        with cache_in_use(cache_params):  # a cache shared by two calls at once raises, not corrupts
            return self._forward(input_ids, inputs_embeds, attention_mask, cache_params, use_cache,
                                 output_hidden_states, record, record_layers)

    def _forward(self, input_ids, inputs_embeds, attention_mask, cache_params, use_cache, output_hidden_states,
                 record, record_layers):
        rec = Recorder.from_argument(record, record_layers)
        owned = not isinstance(record, Recorder)  # a MambaForCausalLM passes its own and reads it itself
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            input_ids = check_input_ids(input_ids, self.config.vocab_size)
            hidden_states = self.embeddings_weight[self.backend.asarray(input_ids)]  # (b, l, d)
        else:
            hidden_states = self.backend.asarray(inputs_embeds, dtype=self.dtype)
            if hidden_states.ndim != 3 or hidden_states.shape[2] != self.config.hidden_size or hidden_states.shape[1] == 0:
                raise ValueError(f"inputs_embeds has shape {tuple(hidden_states.shape)}, "
                                 f"expected (batch, length >= 1, {self.config.hidden_size})")
        b, l = hidden_states.shape[:2]
        if rec is not None:
            rec.put("backbone.embeddings", "", hidden_states)

        if use_cache and cache_params is None:
            cache_params = MambaCache(self.config, b, dtype=self.dtype, backend=self.backend)
        if cache_params is not None and cache_params.max_batch_size != b:
            raise ValueError(f"cache_params holds {cache_params.max_batch_size} rows but the input has {b}")
        mask = check_attention_mask(attention_mask, (b, l), cache_params)
        mask = None if mask is None else self.backend.asarray(mask, dtype=self.dtype)

        # A long input goes through the layers in chunks of prefill_chunk_size tokens, the
        # cache carrying the conv and SSM state from one chunk to the next (a scratch cache
        # when the caller has none): the per-layer activations then never exceed one chunk.
        # Same numbers as one pass, up to float rounding in the matmuls.
        chunk = self.prefill_chunk_size or l
        if l > chunk and cache_params is None:
            cache_params = MambaCache(self.config, b, dtype=self.dtype, backend=self.backend)
        outputs = [self._layers_forward(hidden_states[:, s:s + chunk], cache_params,
                                        None if mask is None else mask[:, s:s + chunk], output_hidden_states, rec)
                   for s in range(0, l, chunk)]  # each: [layer outputs], (b, chunk, d)
        if len(outputs) == 1:
            per_layer = outputs[0]
        else:  # join the chunks back along the sequence
            per_layer = [self.backend.xp.concatenate(parts, axis=1) for parts in zip(*outputs)]
        hidden_states = self.kernels.rms_norm(per_layer[-1], self.norm_f_weight, self.config.layer_norm_epsilon)  # (b, l, d)
        if rec is not None:
            rec.put("backbone.norm_f", "", hidden_states)
        return MambaOutput(last_hidden_state=hidden_states, cache_params=cache_params if use_cache else None,
                           hidden_states=tuple(per_layer) + (hidden_states,) if output_hidden_states else None,
                           record=rec.result() if rec is not None and owned else None)

    def _layers_forward(self, hidden_states, cache_params, mask, output_hidden_states, rec=None):
        """The stack of blocks over one chunk (b, c, d): every layer's output, or only the last."""
        per_layer = []
        for layer in self.layers:
            hidden_states = layer(hidden_states, cache_params, mask, rec)  # (b, c, d)
            if output_hidden_states:
                per_layer.append(hidden_states)
        if cache_params is not None:
            cache_params.seqlen_offset += hidden_states.shape[1]
        return per_layer if output_hidden_states else [hidden_states]


class MambaForCausalLM(_Pretrained):
    """MambaModel plus the language-model head (tied to the embeddings unless the config says not)."""

    prefix = ""

    def __init__(self, config: MambaConfig, dtype="float32", backend="numpy", impl=None, init=True, seed=0):
        self._setup(config, dtype, backend)
        self.backbone = MambaModel(config, dtype, self.backend, impl, init=False)
        self._kernel_slot = self.backbone._kernel_slot  # one kernel set for the whole model
        self.lm_head_weight = None  # (V, d), only when untied
        if init:
            self.load_state_dict(init_weights(config, seed))

    def _setup(self, config, dtype, backend):
        super()._setup(config, dtype, backend)
        if hasattr(self, "backbone"):  # .to(): the backbone follows
            self.backbone._setup(config, dtype, self.backend)

    @property
    def head_weight(self):
        return self.backbone.embeddings_weight if self.config.tie_word_embeddings else self.lm_head_weight

    def __call__(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache_params=None,
                 use_cache=False, output_hidden_states=False, labels=None, logits_to_keep=0,
                 record=False, record_layers=None):
        """logits (b, l, V); `logits_to_keep=1` computes them for the last position only.

        `record=True` (or a name pattern, or a list of them; `record_layers` picks layers) fills
        `.record` with every named intermediate of the pass: the table in minimamba.record.
        """
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an integer >= 0 (0: every position), got {logits_to_keep!r}")
        rec = Recorder.from_argument(record, record_layers)
        outputs = self.backbone(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                cache_params=cache_params, use_cache=use_cache,
                                output_hidden_states=output_hidden_states, record=rec or False)
        hidden_states = outputs.last_hidden_state  # (b, l, d)
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = linear(hidden_states, self.head_weight)  # (b, l, V)
        if rec is not None:
            rec.put("lm_head", "", logits)
        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need the logits of every position; leave logits_to_keep at 0")
            loss = causal_lm_loss(logits, labels, self.config.vocab_size, self.backend)
        return MambaCausalLMOutput(loss=loss, logits=logits, cache_params=outputs.cache_params,
                                   hidden_states=outputs.hidden_states,
                                   record=None if rec is None else rec.result())

    def load_adapter(self, folder, merge=False):
        """Apply a PEFT LoRA adapter folder: unmerged (PEFT's numbers) unless `merge`; see minimamba.adapters."""
        from .adapters import load_adapter

        return load_adapter(self, folder, merge=merge)

    def generate(self, input_ids, **kwargs):
        """Prefill once, then one token at a time through the cache; see minimamba.generation."""
        from .generation import generate

        return generate(self, input_ids, **kwargs)


# ---------------------------------------------------------------- input checks and loss


def check_input_ids(input_ids, vocab_size):
    """(b, l) integer ids in [0, V); a 1-D sequence is taken as a batch of one."""
    if hasattr(input_ids, "get") and not isinstance(input_ids, dict):  # CuPy: check on the host
        input_ids = input_ids.get()
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2:
        raise ValueError(f"input_ids must have shape (batch, length), got {ids.shape}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {ids.shape}); give at least one token per row")
    if ids.dtype == np.bool_ or not (np.issubdtype(ids.dtype, np.integer) or np.issubdtype(ids.dtype, np.floating)):
        raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")  # a boolean mask is not token ids
    if not np.issubdtype(ids.dtype, np.integer):
        if not np.all(np.equal(np.mod(ids, 1), 0)):  # whole floats (1.0) are taken as ids; 1.5, NaN are not
            raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise ValueError(f"token id {int(ids[row, col])} at (row {row}, position {col}) is out of range "
                         f"[0, {vocab_size}) for this model's vocab_size")
    return ids.astype(np.int64, copy=False)


def check_attention_mask(attention_mask, shape, cache_params):
    """A 0/1 mask of the ids' shape, left padding only; None when it masks nothing."""
    if attention_mask is None:
        return None
    if hasattr(attention_mask, "get"):
        attention_mask = attention_mask.get()
    mask = np.asarray(attention_mask)
    if mask.ndim == 1:
        mask = mask[None, :]
    if mask.shape != tuple(shape):
        raise ValueError(f"attention_mask has shape {mask.shape} but input_ids has {tuple(shape)}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    if mask.all():
        return None
    if (np.diff(mask.astype(np.int8), axis=1) < 0).any():
        row = int(np.argwhere(np.diff(mask.astype(np.int8), axis=1) < 0)[0, 0])
        raise ValueError(f"attention_mask row {row} has padding after a token (right padding). Mamba carries a "
                         "state left to right, so pad on the left: padding_side='left'")
    if not mask.any(axis=1).all():
        raise ValueError(f"attention_mask row {int(np.argmin(mask.any(axis=1)))} has no tokens at all")
    if cache_params is not None and cache_params.seqlen_offset > 0:
        raise ValueError("padding in a continuation: the cache already holds tokens, so this chunk cannot "
                         "start with padding")
    return mask


def causal_lm_loss(logits, labels, vocab_size, backend):
    """Mean next-token cross-entropy: logits[:, :-1] against labels[:, 1:], ignoring -100."""
    xp = backend.xp
    if hasattr(labels, "get"):
        labels = labels.get()
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = labels[None, :]
    if labels.shape != tuple(logits.shape[:2]):
        raise ValueError(f"labels has shape {labels.shape} but the logits cover {tuple(logits.shape[:2])}")
    bad = (labels != -100) & ((labels < 0) | (labels >= vocab_size))
    if bad.any():
        raise ValueError(f"label {int(labels[bad][0])} is out of range [0, {vocab_size}) and is not -100")
    target = labels[:, 1:].reshape(-1)  # (b * (l-1),)
    counted = target != -100
    if not counted.any():
        return xp.asarray(float("nan"), dtype=logits.dtype)  # as torch: 0/0
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])[backend.asarray(np.flatnonzero(counted))]  # (t, V)
    top = flat.max(axis=-1, keepdims=True)
    log_z = xp.log(xp.exp(flat - top).sum(axis=-1)) + top[:, 0]  # (t,) logsumexp
    picked = flat[xp.arange(flat.shape[0]), backend.asarray(target[counted])]  # (t,)
    return (log_z - picked).mean()


# ---------------------------------------------------------------- initialisation


def init_weights(config: MambaConfig, seed=0) -> dict:
    """Random weights with transformers' initialisation (MambaPreTrainedModel._init_weights)."""
    rng = np.random.default_rng(seed)
    std = config.initializer_range
    e, n, r, k = config.intermediate_size, config.state_size, config.time_step_rank, config.conv_kernel
    out = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith(("norm.weight", "norm_f.weight")) or name.endswith("mixer.D"):
            value = np.ones(shape)
        elif name.endswith("A_log"):
            value = np.log(np.broadcast_to(np.arange(1, n + 1, dtype=np.float64), (e, n)))  # S4D-real
        elif name.endswith("dt_proj.weight"):
            dt_std = r ** -0.5 * config.time_step_scale
            value = rng.uniform(-dt_std, dt_std, shape)
        elif name.endswith("dt_proj.bias"):  # softplus^-1 of dt drawn log-uniformly in [dt_min, dt_max]
            lo, hi = math.log(config.time_step_min), math.log(config.time_step_max)
            dt = np.maximum(np.exp(rng.uniform(lo, hi, shape)), config.time_step_floor)
            value = dt + np.log(-np.expm1(-dt))
        elif name.endswith("conv1d.weight"):
            bound = 1 / math.sqrt(k)  # kaiming_uniform(a=sqrt(5)) with fan_in = k
            value = rng.uniform(-bound, bound, shape)
        elif name.endswith("out_proj.weight"):
            bound = 1 / math.sqrt(e)
            value = rng.uniform(-bound, bound, shape)
            if config.rescale_prenorm_residual:
                value /= math.sqrt(config.num_hidden_layers)
        elif name.endswith("bias"):
            value = np.zeros(shape)
        else:  # embeddings, in_proj, x_proj, lm_head
            value = rng.normal(0.0, std, shape)
        out[name] = value.astype(np.float32)
    return out
