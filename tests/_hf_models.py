"""Random transformers Mamba models and their minimamba twins (used by the crosscheck suite,
tests/fixtures/make_fixtures.py and tests/fixtures/accuracy_report.py; needs torch + transformers)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import transformers

from minimamba import MambaConfig, MambaForCausalLM

# The shape of state-spaces/mamba-130m-hf: d 768, 24 layers, vocab 50280 (50277 padded to a multiple of 8).
MAMBA_130M = dict(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=24, conv_kernel=4, expand=2)


def random_hf_model(overrides: dict, seed: int) -> transformers.MambaForCausalLM:
    """transformers' initialisation plus noise on every tensor, so no parameter sits at a value
    that hides a bug (D = 1, norm weight = 1, zero biases, A = 1..n)."""
    torch.manual_seed(seed)
    config = transformers.MambaConfig(**overrides, layer_norm_epsilon=1e-5)
    model = transformers.MambaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.add_(0.3 * torch.randn_like(p))  # still the log of a positive A
            elif name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("dt_proj.bias"):
                p.add_(0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.add_(0.05 * torch.randn_like(p))
    return model


def to_minimamba(hf_model, dtype="float32", impl=None) -> MambaForCausalLM:
    """The same weights in minimamba (float32 weights, computed in `dtype`)."""
    config = MambaConfig.from_dict(hf_model.config.to_dict())
    state = {name: value.detach().float().numpy() for name, value in hf_model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return MambaForCausalLM(config, dtype=dtype, impl=impl, init=False).load_state_dict(state)


@contextlib.contextmanager
def transformers_in_true_float64():
    """Make transformers' Mamba compute in float64 everywhere, for a float64-vs-float64 check.

    NOTE: transformers 5.24 keeps float32 in places even in a float64 model: MambaRMSNorm
    normalises in float32, the residual is cast to float32 when residual_in_fp32,
    A = -exp(A_log.float()), D.float(), dt_proj.bias.float(), and the logits come back
    .float(). Inside this context `.float()` leaves float64 tensors alone, RMSNorm and the
    residual stay float64, so both libraries do the same arithmetic in float64.
    """
    from transformers.models.mamba import modeling_mamba

    original_float = torch.Tensor.float
    original_norm = modeling_mamba.MambaRMSNorm.forward

    def float_keeping_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original_float(self, *args, **kwargs)

    def rms_norm_in_input_dtype(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    original_block = modeling_mamba.MambaBlock.forward

    def block_without_float32_residual(self, *args, **kwargs):
        keep, self.residual_in_fp32 = self.residual_in_fp32, False  # else the residual is cast to float32
        try:
            return original_block(self, *args, **kwargs)
        finally:
            self.residual_in_fp32 = keep

    torch.Tensor.float = float_keeping_float64
    modeling_mamba.MambaRMSNorm.forward = rms_norm_in_input_dtype
    modeling_mamba.MambaBlock.forward = block_without_float32_residual
    try:
        yield
    finally:
        torch.Tensor.float = original_float
        modeling_mamba.MambaRMSNorm.forward = original_norm
        modeling_mamba.MambaBlock.forward = original_block


@torch.no_grad()
def hf_logits(hf_model, input_ids, **kwargs):
    out = hf_model(torch.as_tensor(np.asarray(input_ids)), **kwargs)
    return out


@torch.no_grad()
def hf_float64_logits(hf_model64, input_ids):
    """transformers' float64 logits without the final .float(): lm_head applied to norm_f's output in float64."""
    out = hf_model64(torch.as_tensor(np.asarray(input_ids)), output_hidden_states=True)
    last = out.hidden_states[-1]  # norm_f output, float64 dtype
    return (last @ hf_model64.lm_head.weight.T).numpy(), out.logits.numpy()


def max_errors(got, want):
    """(max abs error, max abs error / max |want|): the relative figure is per tensor, so near-zero
    logits do not dominate it."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    max_abs = float(np.abs(got - want).max())
    return max_abs, max_abs / float(np.abs(want).max())
