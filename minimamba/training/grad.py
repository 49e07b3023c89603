"""The whole model's loss and parameter gradients, by chaining the ops of `backward.py`.

    loss, grads = TrainingModel(config, state_dict).loss_and_grad(input_ids)

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

    NOTE: this forward is a second copy of the block's arithmetic (minimamba/model.py has the
    first), kept because the backward needs what the inference kernels do not hand out: the
    scan's chunk-boundary states (kernels/cpu_backward.py), the pre-SiLU conv output, the
    ungated scan output, and the LoRA adapters' dropout masks. tests/test_training_grad.py
    checks, name by name, that its activations equal the model's `record=True` entries.
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
                    raise ImportError("scan='numba' needs numba: pip install 'minimamba[fast]'") from None
                scan = "numpy"
        self.scan = scan
        self.scan_chunk = scan_chunk
        self.selective = selective

    # ------------------------------------------------------------ trainable parameters

    def trainable(self) -> dict:
        """The arrays the optimiser updates (views into the model: updating them in place trains it)."""
        if self.train_base:
            return dict(self.params)
        out = {}
        for module, adapter in self.adapters.items():
            out.update({f"{module}.{k}": v for k, v in adapter.named_arrays().items()})
        return out

    # ------------------------------------------------------------ linear layers, with LoRA when asked

    def _linear_forward(self, module, x, rng, training):
        weight = self.params[module + ".weight"]
        y, _ = op.linear_forward(x, weight, self.params.get(module + ".bias"))
        lora_saved = None
        adapter = self.adapters.get(module)
        if adapter is not None:
            y_lora, lora_saved = lora_ops.lora_linear_forward(x, adapter, rng if training else None)
            y = y + y_lora
        return y, (module, x, lora_saved)

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

    # ------------------------------------------------------------ one mixer block

    def _block_forward(self, i, residual, rng, training):
        cfg, P = self.config, self.params
        e, n, r = cfg.intermediate_size, cfg.state_size, cfg.time_step_rank
        p = f"backbone.layers.{i}."
        m = p + "mixer."
        s = {}
        normed, s["norm"] = op.rms_norm_forward(residual, P[p + "norm.weight"], cfg.layer_norm_epsilon)  # (b, l, d)
        xz, s["in_proj"] = self._linear_forward(m + "in_proj", normed, rng, training)  # (b, l, 2e)
        x, z = xz[..., :e], xz[..., e:]  # (b, l, e) each: x first, gate second
        conv_bias = P.get(m + "conv1d.bias")
        x_conv, s["conv"] = op.causal_conv_forward(x, P[m + "conv1d.weight"][:, 0, :], conv_bias)  # (b, l, e)
        xs, s["silu"] = op.silu_forward(x_conv)  # (b, l, e)
        x_sel = xs if self.selective else np.ones_like(xs)  # selective off: dt, B, C from a vector of ones
        x_dbl, s["x_proj"] = self._linear_forward(m + "x_proj", x_sel, rng, training)  # (b, l, r + 2n)
        dt_low, B, C = x_dbl[..., :r], x_dbl[..., r:r + n], x_dbl[..., r + n:]  # (b, l, r), (b, l, n) x 2
        dt, s["dt_proj"] = self._linear_forward(m + "dt_proj", dt_low, rng, training)  # (b, l, e), bias included
        delta, s["softplus"] = op.softplus_forward(dt)  # (b, l, e)
        A = -np.exp(P[m + "A_log"])  # (e, n)
        D = P[m + "D"]
        B, C = np.ascontiguousarray(B), np.ascontiguousarray(C)
        if self.scan == "numba":
            y, h_start = self._kernels.scan_forward(xs, delta, A, B, C, D, self.scan_chunk)  # (b, l, e)
            s["scan"] = (xs, delta, A, B, C, D, h_start)
        else:
            y, states = op.selective_scan_forward(xs, delta, A, B, C, D)
            s["scan"] = (xs, delta, A, B, C, D, states)
        gated, s["gate"] = op.gate_forward(y, z)  # (b, l, e)
        out, s["out_proj"] = self._linear_forward(m + "out_proj", gated, rng, training)  # (b, l, d)
        return residual + out, s

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
        cfg, P = self.config, self.params
        ids = _check_ids(input_ids, cfg.vocab_size)
        labels = ids if labels is None else np.asarray(labels)
        if labels.shape != ids.shape:
            raise ValueError(f"labels has shape {labels.shape} but input_ids has {ids.shape}")
        hidden, emb_saved = self._embed(ids, rng, training)  # (b, l, d)
        saved = []
        for i in range(cfg.num_hidden_layers):
            hidden, s = self._block_forward(i, hidden, rng, training)
            if keep:
                saved.append(s)
        final, norm_saved = op.rms_norm_forward(hidden, P["backbone.norm_f.weight"], cfg.layer_norm_epsilon)
        b, l, d = final.shape
        feats = final[:, :-1].reshape(-1, d)  # (b (l-1), d): the last position predicts nothing
        logits = feats @ self.head_weight().T  # (b (l-1), V)
        targets = labels[:, 1:].reshape(-1)
        loss, ce_saved = op.cross_entropy_forward(logits, targets)
        cache = (ids, emb_saved, saved, norm_saved, feats, ce_saved, (b, l, d)) if keep else None
        return loss, cache

    def logits(self, input_ids):
        """logits (b, l, V) of the model with its adapters (no dropout); for checks against other libraries."""
        cfg = self.config
        ids = _check_ids(input_ids, cfg.vocab_size, min_length=1)
        hidden, _ = self._embed(ids, None, False)
        for i in range(cfg.num_hidden_layers):
            hidden, _ = self._block_forward(i, hidden, None, False)
        final, _ = op.rms_norm_forward(hidden, self.params["backbone.norm_f.weight"], cfg.layer_norm_epsilon)
        return final @ self.head_weight().T  # (b, l, V)

    def loss(self, input_ids, labels=None) -> float:
        """The loss alone (no dropout, nothing kept for a backward)."""
        return float(self._forward(input_ids, labels, None, training=False, keep=False)[0])

    def loss_and_grad(self, input_ids, labels=None, rng=None):
        """(loss, {name: gradient}) for every trainable array; `rng` drives LoRA dropout."""
        cfg = self.config
        loss, cache = self._forward(input_ids, labels, rng, training=True, keep=True)
        ids, emb_saved, saved, norm_saved, feats, ce_saved, (b, l, d) = cache
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
            dhidden = self._block_backward(i, dhidden, saved[i], grads)
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
