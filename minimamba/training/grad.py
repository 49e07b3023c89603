"""The whole model's loss and parameter gradients: the model's own forward, then the ops of `backward.py` in reverse.

    loss, grads = TrainingModel(config, state_dict).loss_and_grad(input_ids)

One forward (as llm.c): the pass is `MambaForCausalLM`'s, run with `record=` for the
activations the backward reads, and with two kernels plugged in through `impl=`
(`_conv_kernel`, `_scan_kernel`: the same conv and scan) that also keep what the
inference kernels fuse away: the conv's output before its SiLU, the scan's states
and its output before the gate. The backward recomputes RMSNorm's 1/rms.

Parameters are the arrays of `MambaForCausalLM.state_dict()`, by their
transformers names; gradients come back under the same names (and, for LoRA
adapters, under PEFT's names without the `base_model.model.` prefix, e.g.
`backbone.layers.0.mixer.in_proj.lora_A.weight`).

The loss is transformers': logits[:, :-1] against labels[:, 1:] (labels
default to input_ids), mean over the positions whose label is not -100.

Glossary: b batch, l length, d hidden_size, e intermediate_size, n state_size,
k conv_kernel, r time_step_rank, V vocab_size.
"""

from __future__ import annotations

import numpy as np

from ..config import MambaConfig
from . import backward as op
from . import lora as lora_ops

SCAN_IMPLS = ("auto", "numba", "numpy")


class TrainingModel:
    """Weights plus a forward that remembers what its backward needs.

    Args:
        config: the MambaConfig.
        params: {transformers name: array}; float32 for training, float64 for gradient checks.
        adapters: {module name: lora.LoraAdapter} or None; with adapters the base weights are frozen.
        scan: "numba" (kernels/cpu_backward.py, chunked recompute), "numpy" (the readable loop),
            or "auto": numba when it is installed.
        selective: True (Mamba). False is the paper's ablation (`MambaMixer.selective`): x_proj is
            applied to a vector of ones, so dt, B and C are learned constants (an S4-like,
            time-invariant layer); x_proj's weight still gets its gradient, x gets none that way.

    NOTE: no second copy of the block: the forward is the inference model's (see the module
    docstring). The embedding lookup and the head stay here, because a LoRA adapter on the
    embeddings has no place in the inference model and the loss needs only l - 1 positions.
    """

    def __init__(self, config: MambaConfig, params: dict, adapters: dict | None = None, scan="auto",
                 scan_chunk=64, selective=True):
        if scan not in SCAN_IMPLS:
            raise ValueError(f"scan must be one of {SCAN_IMPLS}, got {scan!r}")
        self.config = config
        self.params = params
        self.adapters = adapters or {}
        self.train_base = not self.adapters
        if scan in ("auto", "numba"):
            try:
                from ..kernels import cpu_backward

                self._kernels = cpu_backward
                scan = "numba"
            except ImportError:
                if scan == "numba":
                    raise ImportError("scan='numba' needs numba: pip install numba (from the repository: pip install -e '.[fast]')") from None
                scan = "numpy"
        self.scan = scan
        self.scan_chunk = scan_chunk
        self.selective = selective
        self._model = self._names = self._kernel_saved = None
        self._lora_saved = {}

    # ------------------------------------------------------------ trainable parameters

    def trainable(self) -> dict:
        """The arrays the optimiser updates (views into the model: updating them in place trains it)."""
        if self.train_base:
            return dict(self.params)
        out = {}
        for module, adapter in self.adapters.items():
            out.update({f"{module}.{k}": v for k, v in adapter.named_arrays().items()})
        return out

    # ------------------------------------------------------------ the forward: the model's own

    def _model_for(self, dtype):
        """The inference model that runs the forward, with this model's scan plugged in (made once)."""
        if self._model is None or self._model.dtype != dtype:
            from ..model import MambaForCausalLM

            base = "numpy" if self.scan == "numpy" else None  # conv and rms_norm: readable, or auto (numba)
            self._model = MambaForCausalLM(self.config, dtype=dtype, init=False,
                                           impl={"selective_scan_fn": self._scan_kernel,
                                                 "causal_conv1d_fn": self._conv_kernel, "base": base})
            self._model.backbone.prefill_chunk_size = None  # one pass: the saved activations cover it all
            self._model_names = list(self._model.parameter_shapes())
        return self._model

    def _point_model_at_params(self, rng, keep):
        """Bind the model to the current arrays (no copies) and wrap the adapted weights for this pass
        (keeping their activations for a backward only when `keep`)."""
        model = self._model_for(self.params["backbone.embeddings.weight"].dtype)
        model.load_state_dict({k: self.params[k] for k in self._model_names})
        for layer in model.backbone.layers:
            layer.mixer.selective = self.selective
        self._lora_saved = {}
        for module, adapter in self.adapters.items():
            if adapter.kind == "linear":
                obj, attr = model._slot(module + ".weight")
                setattr(obj, attr, _AdaptedWeight(getattr(obj, attr), adapter, rng, module,
                                                  self._lora_saved if keep else None))
        return model

    def _conv_kernel(self, x, weight, bias=None, activation=None):
        """The model's causal_conv1d_fn while training: it also keeps the padded input and the pre-SiLU output.

        x (b, e, l), weight (e, k), as `ops.causal_conv1d_fn`; inside, backward.py's (b, l, e) layout.
        """
        if activation != "silu":
            raise ValueError("the training conv is the model's: followed by SiLU")
        x_conv, conv_saved = op.causal_conv_forward(x.transpose(0, 2, 1), weight, bias)  # (b, l, e)
        xs, _ = op.silu_forward(x_conv)  # (b, l, e)
        if self._kernel_saved is not None:
            self._kernel_saved.append({"conv": conv_saved, "silu": x_conv})
        return xs.transpose(0, 2, 1)  # (b, e, l)

    def _scan_kernel(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                     return_last_state=False, initial_state=None):
        """The model's selective_scan_fn while training: ops' signature, and it keeps what the backward reads.

        u, delta, z (b, e, l); B, C (b, n, l), as `ops.selective_scan_fn`. Inside, the (b, l, e)
        layout of backward.py: the numba kernel keeps chunk-boundary states, the numpy loop all of them.
        """
        if initial_state is not None or not delta_softplus or z is None:
            raise ValueError("the training scan runs a whole sequence from a zero state, gated, with softplus")
        xs = np.ascontiguousarray(u.transpose(0, 2, 1))  # (b, l, e)
        dt = delta.transpose(0, 2, 1) + delta_bias  # (b, l, e): softplus's input
        delta, _ = op.softplus_forward(dt)  # (b, l, e)
        B, C = np.ascontiguousarray(B.transpose(0, 2, 1)), np.ascontiguousarray(C.transpose(0, 2, 1))  # (b, l, n)
        if self.scan == "numba":
            y, states = self._kernels.scan_forward(xs, delta, A, B, C, D, self.scan_chunk)  # (b, l, e)
        else:
            y, states = op.selective_scan_forward(xs, delta, A, B, C, D)
        z = z.transpose(0, 2, 1)  # (b, l, e)
        gated, _ = op.gate_forward(y, z)  # (b, l, e)
        if self._kernel_saved is not None:  # the conv of this layer has just appended its own entry
            self._kernel_saved[-1].update({"softplus": dt, "scan": (xs, delta, A, B, C, D, states), "gate": (y, z)})
        gated = gated.transpose(0, 2, 1)  # (b, e, l)
        return (gated, None) if return_last_state else gated

    def _saved_from_record(self, i, record, kernel_saved):
        """What block i's backward reads, from the model's record (and the scan's own saved arrays)."""
        cfg, P = self.config, self.params
        r = cfg.time_step_rank
        p = f"backbone.layers.{i}"
        m = p + ".mixer."
        block_in = record["backbone.embeddings"] if i == 0 else record[f"backbone.layers.{i - 1}"]
        xs = record[m + "conv_act"]  # (b, l, e)
        lora = self._lora_saved.get
        return {
            "norm": op.rms_norm_forward(block_in, P[p + ".norm.weight"], cfg.layer_norm_epsilon)[1],  # 1/rms again
            "in_proj": (m + "in_proj", record[p + ".norm"], lora(m + "in_proj")),
            **kernel_saved,  # conv, silu, softplus, scan, gate: kept by the plugged-in kernels
            "x_proj": (m + "x_proj", xs if self.selective else np.ones_like(xs), lora(m + "x_proj")),
            "dt_proj": (m + "dt_proj", record[m + "x_proj"][..., :r], lora(m + "dt_proj")),
            "out_proj": (m + "out_proj", record[m + "gated"], lora(m + "out_proj")),
        }

    def _linear_backward(self, dy, saved, grads):
        module, x, lora_saved = saved
        has_bias = (module + ".bias") in self.params
        dx, dweight, dbias = op.linear_backward(dy, x, self.params[module + ".weight"],
                                                need_weight_grad=self.train_base,
                                                need_bias_grad=self.train_base and has_bias)
        if self.train_base:
            grads[module + ".weight"] = dweight
            if has_bias:
                grads[module + ".bias"] = dbias
        if lora_saved is not None:
            dx_lora, lora_grads = lora_ops.lora_linear_backward(dy, lora_saved, self.adapters[module])
            dx = dx + dx_lora
            grads.update({f"{module}.{k}": v for k, v in lora_grads.items()})
        return dx

    def _block_backward(self, i, dresidual, s, grads):
        cfg, P = self.config, self.params
        p = f"backbone.layers.{i}."
        m = p + "mixer."
        dgated = self._linear_backward(dresidual, s["out_proj"], grads)  # (b, l, e)
        dy, dz = op.gate_backward(dgated, s["gate"])
        xs, delta, A, B, C, D, saved_states = s["scan"]
        if self.scan == "numba":
            du, ddelta, dA, dB, dC, dD = self._kernels.scan_backward(xs, delta, A, B, C, D, saved_states, dy,
                                                                     self.scan_chunk)
        else:
            du, ddelta, dA, dB, dC, dD = op.selective_scan_backward(dy, xs, delta, A, B, C, D, saved_states)
        ddt = op.softplus_backward(ddelta, s["softplus"])  # (b, l, e)
        ddt_low = self._linear_backward(ddt, s["dt_proj"], grads)  # (b, l, r)
        dx_dbl = np.concatenate([ddt_low, dB, dC], axis=-1)  # (b, l, r + 2n)
        dx_sel = self._linear_backward(dx_dbl, s["x_proj"], grads)  # (b, l, e)
        dxs = dx_sel + du if self.selective else du  # selective off: x_proj read ones, not x
        dx_conv = op.silu_backward(dxs, s["silu"])
        dx, dconv_w, dconv_b = op.causal_conv_backward(dx_conv, s["conv"], need_bias_grad=(m + "conv1d.bias") in P)
        dxz = np.concatenate([dx, dz], axis=-1)  # (b, l, 2e)
        dnormed = self._linear_backward(dxz, s["in_proj"], grads)  # (b, l, d)
        dres_norm, dnorm_w = op.rms_norm_backward(dnormed, s["norm"])
        if self.train_base:
            grads[m + "A_log"] = dA * A  # A = -exp(A_log), so dA/dA_log = A
            grads[m + "D"] = dD
            grads[m + "conv1d.weight"] = dconv_w[:, None, :]
            if dconv_b is not None:
                grads[m + "conv1d.bias"] = dconv_b
            grads[p + "norm.weight"] = dnorm_w
        return dresidual + dres_norm

    # ------------------------------------------------------------ the whole model

    def _embed(self, ids, rng, training):
        E = self.params["backbone.embeddings.weight"]
        hidden, _ = op.embedding_forward(E, ids)  # (b, l, d)
        adapter = self.adapters.get("backbone.embeddings")
        lora_saved = None
        if adapter is not None:
            h_lora, lora_saved = lora_ops.lora_embedding_forward(ids, adapter)
            hidden = hidden + h_lora
        return hidden, lora_saved

    def head_weight(self):
        # NOTE: with a LoRA adapter on the embeddings, the tied head still uses the base
        # embedding matrix, as PEFT does (its adapter wraps the embedding module only).
        if self.config.tie_word_embeddings:
            return self.params["backbone.embeddings.weight"]
        return self.params["lm_head.weight"]

    def _forward(self, input_ids, labels, rng, training, keep):
        cfg = self.config
        ids = _check_ids(input_ids, cfg.vocab_size)
        labels = ids if labels is None else np.asarray(labels)
        if labels.shape != ids.shape:
            raise ValueError(f"labels has shape {labels.shape} but input_ids has {ids.shape}")
        final, emb_saved, saved = self._backbone(ids, rng if training else None, keep)
        b, l, d = final.shape
        feats = final[:, :-1].reshape(-1, d)  # (b (l-1), d): the last position predicts nothing
        logits = feats @ self.head_weight().T  # (b (l-1), V)
        targets = labels[:, 1:].reshape(-1)
        loss, ce_saved = op.cross_entropy_forward(logits, targets)
        cache = (ids, emb_saved, saved, feats, ce_saved, (b, l, d)) if keep else None
        return loss, cache

    def _backbone(self, ids, rng, keep):
        """The embeddings here (they may carry a LoRA adapter), then the model's own forward, recording
        what the backward reads: (norm_f output (b, l, d), embedding LoRA saved, (record, [scan's saved per layer]))."""
        hidden, emb_saved = self._embed(ids, rng, rng is not None)  # (b, l, d)
        model = self._point_model_at_params(rng, keep)
        self._kernel_saved = [] if keep else None
        try:
            out = model.backbone(inputs_embeds=hidden, record=self._record_names() if keep else False)
        finally:
            kernel_saved, self._kernel_saved = self._kernel_saved, None
        return out.last_hidden_state, emb_saved, (out.record, kernel_saved) if keep else None

    def _record_names(self):
        if self._names is None:  # exact names (no wildcards): the Recorder matches them by a set lookup
            per_layer = ("norm", "mixer.in_proj", "mixer.conv_act", "mixer.x_proj", "mixer.gated", "")
            self._names = ["backbone.embeddings"] + [f"backbone.layers.{i}.{n}".rstrip(".") for i in
                                                     range(self.config.num_hidden_layers) for n in per_layer]
        return self._names

    def logits(self, input_ids):
        """logits (b, l, V) of the model with its adapters (no dropout); for checks against other libraries."""
        ids = _check_ids(input_ids, self.config.vocab_size, min_length=1)
        final, _, _ = self._backbone(ids, None, keep=False)
        return final @ self.head_weight().T  # (b, l, V)

    def loss(self, input_ids, labels=None) -> float:
        """The loss alone (no dropout, nothing kept for a backward)."""
        return float(self._forward(input_ids, labels, None, training=False, keep=False)[0])

    def loss_and_grad(self, input_ids, labels=None, rng=None):
        """(loss, {name: gradient}) for every trainable array; `rng` drives LoRA dropout."""
        cfg = self.config
        loss, cache = self._forward(input_ids, labels, rng, training=True, keep=True)
        ids, emb_saved, (record, kernel_saved), feats, ce_saved, (b, l, d) = cache
        last = record[f"backbone.layers.{cfg.num_hidden_layers - 1}"]  # norm_f's input
        norm_saved = op.rms_norm_forward(last, self.params["backbone.norm_f.weight"], cfg.layer_norm_epsilon)[1]
        grads = {}
        dlogits = op.cross_entropy_backward(1.0, ce_saved)  # (b (l-1), V)
        W_head = self.head_weight()
        dfeats = dlogits @ W_head  # (b (l-1), d)
        dW_head = dlogits.T @ feats if self.train_base else None  # (V, d)
        dfinal = np.zeros((b, l, d), dtype=feats.dtype)
        dfinal[:, :-1] = dfeats.reshape(b, l - 1, d)
        dhidden, dnorm_f = op.rms_norm_backward(dfinal, norm_saved)
        if self.train_base:
            grads["backbone.norm_f.weight"] = dnorm_f
        for i in range(cfg.num_hidden_layers - 1, -1, -1):
            saved = self._saved_from_record(i, record, kernel_saved[i])  # built layer by layer: bounded memory
            dhidden = self._block_backward(i, dhidden, saved, grads)
        if self.train_base:
            dE = op.embedding_backward(dhidden, ids, cfg.vocab_size)
            if cfg.tie_word_embeddings:
                dE += dW_head  # tied: the embedding matrix is also the head
            else:
                grads["lm_head.weight"] = dW_head
            grads["backbone.embeddings.weight"] = dE
        if emb_saved is not None:
            lora_grads = lora_ops.lora_embedding_backward(dhidden, emb_saved, self.adapters["backbone.embeddings"])
            grads.update({f"backbone.embeddings.{k}": v for k, v in lora_grads.items()})
        self._lora_saved = {}  # the adapters' activations are spent: free them before the next pass
        return float(loss), grads


def _check_ids(input_ids, vocab_size, min_length=2):
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] < min_length:
        raise ValueError(f"input_ids must have shape (batch, length >= {min_length})"
                         f"{' for a next-token loss' if min_length == 2 else ''}, got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got min {ids.min()} max {ids.max()}")
    return ids.astype(np.int64, copy=False)


class _AdaptedWeight:
    """A base weight with its LoRA adapter, as the model's `ops.linear` calls it: x W^T + lora(x).

    The adapter's forward keeps its dropout mask and low-rank activations for the backward
    in `saved` (None: a pass with no backward keeps nothing).
    """

    def __init__(self, weight, adapter, rng, module, saved):
        self.weight, self.adapter, self.rng, self.module, self.saved = weight, adapter, rng, module, saved
        self.shape, self.dtype = weight.shape, weight.dtype

    def linear(self, x):
        y_lora, kept = lora_ops.lora_linear_forward(x, self.adapter, self.rng)
        if self.saved is not None:
            self.saved[self.module] = kept
        return x @ self.weight.T + y_lora  # (..., out)
