"""A decode step of a model on CuPy captured once as a CUDA graph, then replayed.

One decode step of the 130m model is some 400 small launches (24 layers of
norm, projections, conv, scan, gates), each a few microseconds of GPU work
behind tens of microseconds of Python. Capturing the step once through CuPy's
stream capture and replaying the graph submits all of them in one call.

NOTE: why `decode_logits` is a second copy of the block's arithmetic (model.py
has the first). A captured CUDA graph replays fixed device work, so the step it
captures must (1) read and write fixed buffers: the tokens come from
`step.tokens` and the logits land in `step.logits`, where the model's call takes
host ids and returns new arrays; (2) never synchronise with the host: the
model's call checks the token ids on the host (a device-to-host copy), which
capture forbids; (3) make no cuBLAS call: CuPy (13, 14) refuses one while a
stream is capturing ("calling cuBLAS API during stream capture is currently
unsupported"), so the model's `ops.linear` (`x @ W.T`) cannot be captured.
`decode_logits` is therefore the decode step written out with
`minimamba.kernels.cuda.linear` (a Numba kernel) for the projections, the CUDA
conv and state-update kernels, and CuPy elementwise ops and reductions, on
device arrays only. tests/gpu checks it against the model's own decode step
(logits and cache), so the two copies cannot drift apart unnoticed.

    step = GraphDecodeStep(model, cache)        # after a prefill into `cache`
    logits = step(next_tokens)                  # (b, V), advances the cache by one token

The graph reads its input tokens from, and writes its logits to, fixed device
buffers (`step.tokens`, `step.logits`): the logits returned are overwritten by
the next call. With greedy=True the graph also writes argmax(logits) into
`step.tokens`, so `step()` with no argument decodes greedily without leaving the GPU.
"""

from __future__ import annotations


def decode_logits(model, cache, tokens, A=None):
    """One decode step through `cache` (updated in place): tokens (b,) -> logits (b, V).

    The model's decode step (MambaForCausalLM.__call__ with l = 1) without cuBLAS.
    `A` is the per-layer list of -exp(A_log), computed here when not given.
    """
    from minimamba.kernels import cuda as kc
    from minimamba.ops import rms_norm

    config, backbone = model.config, model.backbone
    e, n, r, eps = config.intermediate_size, config.state_size, config.time_step_rank, config.layer_norm_epsilon
    if A is None:
        A = [-array_exp(layer.mixer.A_log) for layer in backbone.layers]
    hidden = backbone.embeddings_weight[tokens]  # (b, d)
    for i, layer in enumerate(backbone.layers):
        m = layer.mixer
        normed = rms_norm(hidden, layer.norm_weight, eps)  # (b, d)
        xz = kc.linear(normed, m.in_proj_weight, m.in_proj_bias)  # (b, 2e): x, then the gate z
        x = kc.causal_conv1d_update(xz[:, :e], cache.conv_states[i], m.conv1d_weight[:, 0, :], m.conv1d_bias,
                                    activation="silu")  # (b, e)
        x_dbl = kc.linear(x, m.x_proj_weight)  # (b, r + 2n)
        dt = kc.linear(x_dbl[:, :r], m.dt_proj_weight)  # (b, e); its bias goes inside the softplus
        y = kc.selective_state_update(cache.ssm_states[i], x, dt, A[i], x_dbl[:, r:r + n], x_dbl[:, r + n:],
                                      D=m.D, z=xz[:, e:], dt_bias=m.dt_proj_bias, dt_softplus=True)  # (b, e)
        hidden = hidden + kc.linear(y, m.out_proj_weight, m.out_proj_bias)  # (b, d)
    hidden = rms_norm(hidden, backbone.norm_f_weight, eps)
    cache.seqlen_offset += 1
    return kc.linear(hidden, model.head_weight)  # (b, V)


def array_exp(x):
    from minimamba.ops import array_module

    return array_module(x).exp(x)


class GraphDecodeStep:
    def __init__(self, model, cache, greedy=False):
        import cupy

        if model.backend.name != "cupy":
            raise ValueError("GraphDecodeStep needs a model on backend='cupy' (model.to('cupy'))")
        if cache.backend.name != "cupy":
            raise ValueError("GraphDecodeStep needs a MambaCache on backend='cupy'")
        self.model, self.cache, self.greedy = model, cache, greedy
        self.A = [-array_exp(layer.mixer.A_log) for layer in model.backbone.layers]  # (e, n) per layer, fixed
        self.tokens = cupy.zeros((cache.max_batch_size,), dtype=cupy.int64)  # (b,) the graph's input
        self.pool = cupy.cuda.MemoryPool()  # the graph's own memory: never handed to anyone else
        capture_stream = cupy.cuda.Stream(non_blocking=True)
        states = cache.conv_states + cache.ssm_states
        saved = [s.copy() for s in states]
        offset = cache.seqlen_offset
        with capture_stream, cupy.cuda.using_allocator(self.pool.malloc):
            # A first eager step compiles every kernel and fills the private pool, so that the
            # capture allocates nothing new (no cudaMalloc while capturing).
            self._step()
            capture_stream.synchronize()
            capture_stream.begin_capture()
            try:
                self.logits = self._step()  # (b, V): recorded, not run
            finally:
                self.graph = capture_stream.end_capture()
            for state, copy in zip(states, saved):  # undo the warm-up step
                state[...] = copy
        capture_stream.synchronize()
        cache.seqlen_offset = offset

    def _step(self):
        logits = decode_logits(self.model, self.cache, self.tokens, self.A)  # (b, V)
        if self.greedy:
            self.tokens[...] = logits.argmax(axis=-1)
        return logits

    def __call__(self, tokens=None):
        """Run one step on `tokens` (b,) (the last greedy pick when None); returns the logits buffer."""
        import cupy

        if tokens is not None:
            self.tokens[...] = cupy.asarray(tokens, dtype=cupy.int64).reshape(self.tokens.shape)
        self.graph.launch(stream=cupy.cuda.get_current_stream())
        self.cache.seqlen_offset += 1
        return self.logits
