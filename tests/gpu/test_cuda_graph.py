"""kernels.cuda_graph.GraphDecodeStep is never silently stale (issue 11).

An in-place edit of a parameter after the graph was captured changes the next step's
logits exactly as a reload of the edited weights would; a parameter replaced by a new
array is refused, naming it. Reference: the model's own (eager) decode step on a model
reloaded from the edited weights, from the same prefilled cache.

Under the simulator there is no CUDA graph: `fake_graphs` gives the fake cupy a
stream whose capture returns a graph that replays by running the captured step again
(`step._step()`, writing into the captured logits buffer, without the host-side
bookkeeping a real replay skips too). Like a real graph it reads whatever the model's
arrays hold at replay time, and like a real graph it replays any value the step
computed outside the capture and kept: the old `self.A = -exp(A_log)` made at
construction fails `test_graph_step_follows_in_place_edits` here. A replaced array is
the one case where the fake and a real graph differ (a real one keeps reading the old
buffer): the step refuses before launching, which is what the second test checks.
On a GPU (MINIMAMBA_GPU_TESTS=1) both tests run on real CuPy graphs.
"""

import contextlib
import sys
import types

import numpy as np
import pytest

from gpu_helpers import SIMULATOR, assert_close
from minimamba import MambaCache, MambaConfig, MambaForCausalLM
from test_cuda_model import TOL, cupy_backend, host  # noqa: F401 - cupy_backend is a fixture

# (parameter, in-place edit): A_log was the stale one (A = -exp(A_log) computed once at capture); the graph
# reads every other parameter from its buffer. One of each kind, in both layers and outside them.
EDITS = {name: (lambda a: a.__iadd__(0.5)) for name in (  # A x 1.65; the biases start at 0 or near it
    "backbone.layers.0.mixer.A_log", "backbone.layers.1.mixer.A_log", "backbone.layers.0.mixer.conv1d.bias",
    "backbone.layers.1.mixer.dt_proj.bias")}
EDITS.update((name, lambda a: a.__imul__(1.5)) for name in (
    "backbone.embeddings.weight", "backbone.layers.1.norm.weight", "backbone.layers.0.mixer.in_proj.weight",
    "backbone.layers.1.mixer.conv1d.weight", "backbone.layers.1.mixer.x_proj.weight",
    "backbone.layers.0.mixer.dt_proj.weight", "backbone.layers.0.mixer.D", "backbone.layers.1.mixer.out_proj.weight",
    "backbone.norm_f.weight"))


class _FakeGraph:
    def __init__(self, step):
        self.step = step

    def launch(self, stream=None):
        cache = self.step.cache
        offset = cache.seqlen_offset  # a real replay runs no Python: GraphDecodeStep.__call__ advances it
        self.step.logits[...] = self.step._step()
        cache.seqlen_offset = offset


class _FakeStream:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass

    def begin_capture(self):
        pass

    def end_capture(self):
        return _FakeGraph(sys._getframe(1).f_locals["self"])  # the GraphDecodeStep whose __init__ captures


@pytest.fixture
def fake_graphs(cupy_backend, kc, monkeypatch):  # noqa: F811 - the fixture imported above
    """Stream capture and graph launch for the fake cupy (nothing to add on a real GPU).

    Under the simulator the step's projections are ops.linear (x @ W.T, what the eager model runs):
    kernels.cuda.linear runs a Python thread per GPU thread there (27 projections took 23 s), and
    test_cuda_model checks it against the model already; here the subject is staleness.
    """
    if not SIMULATOR:
        return
    from minimamba import ops

    monkeypatch.setattr(kc, "linear", ops.linear)  # decode_logits looks kc.linear up at each call
    fake_cuda = types.SimpleNamespace(
        runtime=cupy_backend.cuda.runtime, Stream=lambda non_blocking=False: _FakeStream(),
        MemoryPool=lambda: types.SimpleNamespace(malloc=None), get_current_stream=lambda: None,
        using_allocator=lambda malloc: contextlib.nullcontext())
    monkeypatch.setattr(cupy_backend, "cuda", fake_cuda)


# Small in every dimension (the simulator runs a Python thread per GPU thread; linear runs a block per
# output). Steps dt of 0.3 to 1, and x_proj scaled by X_PROJ_SCALE in `selective_model`: at initialisation
# dt ~ 0.01 and B, C ~ 0.1, so the state hardly reaches the logits and editing A_log by 0.5 moves them by
# ~1e-5 (below TOL); with these, by ~1e-2 (measured on the NumPy model), 20x the tolerance and more.
SMALL = MambaConfig(vocab_size=13, hidden_size=8, state_size=3, num_hidden_layers=2, conv_kernel=3,
                    time_step_rank=2, expand=2, time_step_min=0.3, time_step_max=1.0)
X_PROJ_SCALE = 30.0


def selective_model():
    model = MambaForCausalLM(SMALL, seed=0).to("cupy", impl="cuda")
    for layer in model.backbone.layers:
        layer.mixer.x_proj_weight *= X_PROJ_SCALE  # larger B and C: the state matters (see above)
    return model


def prefilled(model, ids, copies):
    """`copies` caches holding the same state: `model` run on `ids` once, then the states copied."""
    caches = [MambaCache(model.config, ids.shape[0], backend=model.backend) for _ in range(copies)]
    model(ids, cache_params=caches[0], use_cache=True)
    for cache in caches[1:]:
        for mine, first in zip(cache.conv_states + cache.ssm_states, caches[0].conv_states + caches[0].ssm_states):
            mine[...] = first
        cache.seqlen_offset = caches[0].seqlen_offset
    return caches


def reload(model):
    """The model's current weights, through the host, into a fresh model: what a reload gives."""
    state = {name: host(value) for name, value in model.state_dict().items()}
    return MambaForCausalLM(model.config, init=False).load_state_dict(state).to("cupy", impl="cuda")


@pytest.mark.parametrize("name", list(EDITS))
def test_graph_step_follows_in_place_edits(fake_graphs, rng, name):
    from minimamba.kernels.cuda_graph import GraphDecodeStep

    model = selective_model()
    ids = rng.integers(0, SMALL.vocab_size, (2, 4))  # (b, l)
    tokens = rng.integers(0, SMALL.vocab_size, (2,))  # (b,)
    graph_cache, reload_cache, unedited_cache = prefilled(model, ids, 3)
    step = GraphDecodeStep(model, graph_cache)
    unedited = host(model(tokens[:, None], cache_params=unedited_cache, use_cache=True).logits)[:, -1]  # (b, V)

    EDITS[name](model.state_dict()[name])  # in place, after the capture
    got = host(step(tokens))  # (b, V)
    expected = host(reload(model)(tokens[:, None], cache_params=reload_cache, use_cache=True).logits)[:, -1]
    moved = float(np.abs(expected - unedited).max())
    print(f"{name}: the edit moves the reloaded model's logits by {moved:.2e}")
    # a stale step (the unedited logits) must fail the check below by 10x at least
    assert moved > 10 * TOL * (1 + float(np.abs(expected).max())), "the edit is too small to test anything"
    assert_close(f"graph step after an in-place edit of {name} vs a reload", got, expected, TOL)
    assert graph_cache.seqlen_offset == ids.shape[1] + 1


def test_graph_step_refuses_a_replaced_parameter(fake_graphs):
    from minimamba.kernels.cuda_graph import GraphDecodeStep

    model = MambaForCausalLM(SMALL, seed=0).to("cupy", impl="cuda")
    step = GraphDecodeStep(model, MambaCache(SMALL, 2, backend=model.backend))  # an empty cache will do
    mixer = model.backbone.layers[1].mixer
    mixer.A_log = mixer.A_log + 0.5  # a new array: the graph was captured reading the old one
    with pytest.raises(ValueError, match=r"backbone\.layers\.1\.mixer\.A_log was replaced"):
        step(np.array([1, 2]))
