"""Every named intermediate of one forward pass: `model(input_ids, record=True).record`.

    out = model(ids, record=True)                         # everything
    out = model(ids, record="*.x_proj")                   # one name pattern (fnmatch), every layer
    out = model(ids, record=["*.scan", "lm_head"], record_layers=[0, 3])
    out.record                                            # {name: array}, in forward order

A name is the path of the transformers module whose output it is, when there is
such a module (`backbone.layers.3.mixer.in_proj`), and then it holds exactly what
a PyTorch forward hook on that module of transformers' `MambaForCausalLM` returns:
same shape, same layout. Other intermediates are named after the mixer that makes
them (`backbone.layers.3.mixer.dt_softplus`). Names are always those of a
`MambaForCausalLM`, also when a bare `MambaModel` records.

| name (i = layer)                        | shape        | what it holds                                            | hook |
| --------------------------------------- | ------------ | -------------------------------------------------------- | ---- |
| backbone.embeddings                     | (b, l, d)    | the embedded input ids (or inputs_embeds)                | yes  |
| backbone.layers.i.norm                  | (b, l, d)    | the block's RMSNorm of its input: the mixer's input      | yes  |
| backbone.layers.i.mixer.in_proj         | (b, l, 2e)   | in_proj's output: x (first e), gate z (last e)           | yes  |
| backbone.layers.i.mixer.conv_act        | (b, l, e)    | causal conv1d + bias, then SiLU (then the padding mask)  | -    |
| backbone.layers.i.mixer.x_proj          | (b, l, r+2n) | x_proj's output: dt (r), B (n), C (n)                    | yes  |
| backbone.layers.i.mixer.dt_proj         | (b, l, e)    | dt_proj's output, its bias included (softplus's input)   | (1)  |
| backbone.layers.i.mixer.dt_softplus     | (b, l, e)    | Delta = softplus(dt_proj): the step size                 | -    |
| backbone.layers.i.mixer.B               | (b, l, n)    | the input matrix B (a slice of x_proj)                   | -    |
| backbone.layers.i.mixer.C               | (b, l, n)    | the output matrix C (a slice of x_proj)                  | -    |
| backbone.layers.i.mixer.scan            | (b, l, e)    | the scan's y = C.h + D x, before the gate                | -    |
| backbone.layers.i.mixer.gated           | (b, l, e)    | y * silu(z): out_proj's input                            | -    |
| backbone.layers.i.mixer.out_proj        | (b, l, d)    | out_proj's output (also what a hook on `mixer` returns)  | yes  |
| backbone.layers.i.mixer.conv_state      | (b, e, k)    | the cache's conv state after this pass (cache only)      | -    |
| backbone.layers.i.mixer.ssm_state       | (b, e, n)    | the cache's SSM state after this pass (cache only)       | -    |
| backbone.layers.i                       | (b, l, d)    | the block's output: input + out_proj                     | yes  |
| backbone.norm_f                         | (b, l, d)    | the final RMSNorm                                        | yes  |
| lm_head                                 | (b, l, V)    | the logits (the positions logits_to_keep keeps)          | yes  |

(1) transformers 5.24 multiplies by `dt_proj.weight` directly, so a hook on
dt_proj does not fire; the entry holds what the module would return. Likewise
its conv1d and act modules are not called (the conv is a function), so the
conv's output has no hook name. With an attention_mask, transformers zeroes the
mixer's input before in_proj and minimamba zeroes x after it: the padded
positions of `in_proj` differ (the numbers every real token sees do not).

The state entries (the conv and SSM state a decode step continues from) are
recorded when the pass uses a cache (the caller's, or the scratch cache a prefill
longer than `prefill_chunk_size` runs through). `scan` runs the scan kernel a second time,
without the gate, so the gated output the model uses is the kernel's own fused
result: recording never changes the model's outputs.
"""

from __future__ import annotations

import fnmatch
import re

STATE_NAMES = ("conv_state", "ssm_state")  # per-pass snapshots, not sequences: the last chunk's wins
LAYER_NAME = re.compile(r"^backbone\.layers\.(\d+)(?:\.(.*))?$")  # (layer index, what in the layer)


class Recorder:
    """Collects the intermediates a forward pass offers it, keeping those asked for.

    Args:
        names: None (all), a pattern or a list of patterns (fnmatch, e.g. "*.x_proj").
        layers: None (all) or an iterable of layer indices; entries outside the layers
            (embeddings, norm_f, lm_head) are kept whatever `layers` says, subject to `names`.
    """

    def __init__(self, names=None, layers=None):
        if isinstance(names, str):
            names = [names]
        self.patterns = None if names is None else [p for p in names if any(c in p for c in "*?[")]
        self.exact = set() if names is None else {p for p in names if not any(c in p for c in "*?[")}
        self.layers = None if layers is None else {int(i) for i in layers}
        self._wanted = {}
        self._chunks = {}  # name -> [array per chunk of the sequence]

    @classmethod
    def from_argument(cls, record, record_layers=None):
        """The `record=` argument of a forward: False/None (no recorder), True, patterns, or a Recorder."""
        if isinstance(record, Recorder):
            return record
        if record is None or record is False:
            if record_layers is not None:
                raise ValueError("record_layers is given but record is off; pass record=True as well")
            return None
        if record is True:
            return cls(None, record_layers)
        if isinstance(record, str) or (isinstance(record, (list, tuple)) and all(isinstance(p, str) for p in record)):
            return cls(record, record_layers)
        raise ValueError(f"record must be True, a name pattern or a list of patterns, got {record!r}")

    def wants(self, prefix, short=""):
        name = f"{prefix}.{short}" if short else prefix
        hit = self._wanted.get(name)
        if hit is None:
            hit = self._wanted[name] = self._match(name)
        return hit

    def _match(self, name):
        layer = LAYER_NAME.match(name)
        if self.layers is not None and layer and int(layer.group(1)) not in self.layers:
            return False
        if self.patterns is None and not self.exact:
            return True
        return name in self.exact or any(fnmatch.fnmatchcase(name, p) for p in self.patterns or ())

    def put(self, prefix, short, value):
        """Keep `value` under "prefix.short" if asked for (value may be a function, called only then)."""
        if not self.wants(prefix, short):
            return
        name = f"{prefix}.{short}" if short else prefix
        self._chunks.setdefault(name, []).append(value() if callable(value) else value)

    def result(self) -> dict:
        """{name: array} in forward order; a prefill run in chunks is joined back along the sequence."""
        out = {}
        for name, parts in self._chunks.items():
            if len(parts) == 1 or name.endswith(STATE_NAMES):
                out[name] = parts[-1]
            else:
                xp = _array_module(parts[0])
                out[name] = xp.concatenate(parts, axis=1)
        return out


class _NotRecording:
    """Stands in for a Recorder when nothing is recorded: every put is a no-op."""

    def wants(self, prefix, short=""):
        return False

    def put(self, prefix, short, value):
        pass


NOT_RECORDING = _NotRecording()


def _array_module(a):
    from .ops import array_module

    return array_module(a)
