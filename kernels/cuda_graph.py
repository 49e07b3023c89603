"""A decode step of a CuPy model captured once as a CUDA graph, then replayed.

One decode step of the 130m model is some 400 small launches (24 layers of
norm, three projections, conv, scan, gates), each a few microseconds of GPU
work behind tens of microseconds of Python. Capturing the step once through
CuPy's stream capture and replaying the graph submits all of them in one call.

    step = GraphDecodeStep(model, cache)        # after a prefill into `cache`
    logits = step(next_tokens)                  # (b, V), advances the cache by one token

The graph reads its input tokens from, and writes its logits to, fixed device
buffers (`step.tokens`, `step.logits`): the logits returned are overwritten by
the next call. With greedy=True the graph also writes argmax(logits) into
`step.tokens`, so `step()` with no argument decodes greedily without leaving the GPU.
"""

from __future__ import annotations


class GraphDecodeStep:
    def __init__(self, model, cache, greedy=False):
        import cupy

        if model.backend.name != "cupy":
            raise ValueError("GraphDecodeStep needs a model on backend='cupy' (model.to('cupy'))")
        if cache.backend.name != "cupy":
            raise ValueError("GraphDecodeStep needs a MambaCache on backend='cupy'")
        self.model, self.cache, self.greedy = model, cache, greedy
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
        backbone = self.model.backbone
        embeds = backbone.embeddings_weight[self.tokens][:, None, :]  # (b, 1, d)
        out = self.model(inputs_embeds=embeds, cache_params=self.cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]  # (b, V)
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
