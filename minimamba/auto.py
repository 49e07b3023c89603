"""transformers' entry points, for code written against them: change the import, use NumPy.

    from minimamba import pipeline
    generator = pipeline(task="text-generation", model="state-spaces/mamba-130m-hf")
    generator("Plants create energy through a process known as")   # [{"generated_text": "..."}]

    from minimamba import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained("state-spaces/mamba-130m-hf")
    model = AutoModelForCausalLM.from_pretrained("state-spaces/mamba-130m-hf")
    inputs = tokenizer("Plants create energy through a process known as", return_tensors="np").to(model.device)
    output = model.generate(**inputs)
    print(tokenizer.decode(output[0], skip_special_tokens=True))

The Auto* names are thin aliases of MambaForCausalLM / MambaModel / Tokenizer. PyTorch's
arguments are mapped where they mean something here and refused in one line otherwise:
  dtype / torch_dtype  torch.float32 or "float32" -> float32, float64 -> float64, "auto" ->
                       float32; float16 / bfloat16 -> float32 with a warning (minimamba
                       computes in float32; half-precision checkpoints load exactly)
  device / device_map  "cpu", -1, "auto" -> NumPy on the CPU; 0, "cuda", "cuda:0",
                       {"": 0} -> CuPy on the GPU (backend="cupy")
"""

from __future__ import annotations

import warnings

COMPUTE_DTYPES = {"float32": "float32", "float64": "float64", "double": "float64", "float": "float32",
                  "auto": "float32"}
HALF_DTYPES = ("float16", "half", "bfloat16")


def map_dtype(dtype) -> str:
    """A torch dtype, NumPy dtype or name -> "float32" / "float64" (what minimamba computes in)."""
    if dtype is None:
        return "float32"
    name = str(getattr(dtype, "__name__", dtype)).removeprefix("torch.")  # torch.float16 prints as "torch.float16"
    if name in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[name]
    if name in HALF_DTYPES:
        warnings.warn(f"dtype {name}: minimamba computes in float32 (a {name} checkpoint loads exactly); "
                      "pass dtype='float32' to silence this", stacklevel=4)
        return "float32"
    raise ValueError(f"dtype {dtype!r} is not supported; minimamba computes in float32 or float64")


def map_device(device=None, device_map=None) -> str:
    """transformers' device / device_map -> minimamba's backend ("numpy" on the CPU, "cupy" on the GPU)."""
    if device is not None and device_map is not None:
        raise ValueError("pass device or device_map, not both")
    where = device_map if device is None else device
    if isinstance(where, dict):
        places = set(where.values())
        if len(places) != 1:
            raise ValueError(f"device_map {where!r} splits the model over devices; minimamba keeps it on one")
        where = places.pop()
    where = str(getattr(where, "type", where))  # a torch.device
    if where in ("None", "cpu", "-1", "auto"):
        return "numpy"
    if where in ("0", "cuda", "cuda:0", "gpu"):
        return "cupy"
    raise ValueError(f"device {where!r} is not supported; minimamba runs on 'cpu' (NumPy) or GPU 0 (CuPy)")


def _backend_kwargs(kwargs) -> dict:
    dtype = kwargs.pop("dtype", None)
    torch_dtype = kwargs.pop("torch_dtype", None)
    backend = kwargs.pop("backend", None) or map_device(kwargs.pop("device", None), kwargs.pop("device_map", None))
    out = {"dtype": map_dtype(dtype if dtype is not None else torch_dtype), "backend": backend}
    for name in ("impl", "revision", "cache_dir"):
        if name in kwargs:
            out[name] = kwargs.pop(name)
    kwargs.pop("trust_remote_code", None)  # nothing remote runs here
    if kwargs:
        raise ValueError(f"{', '.join(sorted(kwargs))}: not supported by minimamba's from_pretrained")
    return out


class AutoModelForCausalLM:
    """transformers' name for `MambaForCausalLM.from_pretrained` (every model here is a Mamba)."""

    @staticmethod
    def from_pretrained(path_or_repo_id, **kwargs):
        from .model import MambaForCausalLM

        return MambaForCausalLM.from_pretrained(path_or_repo_id, **_backend_kwargs(kwargs))


class AutoModel:
    """transformers' name for `MambaModel.from_pretrained` (no head: last_hidden_state)."""

    @staticmethod
    def from_pretrained(path_or_repo_id, **kwargs):
        from .model import MambaModel

        return MambaModel.from_pretrained(path_or_repo_id, **_backend_kwargs(kwargs))


class AutoTokenizer:
    """transformers' name for `Tokenizer.from_pretrained` (tokenizer.json from a folder or Hub repo)."""

    @staticmethod
    def from_pretrained(path_or_repo_id, **kwargs):
        from .tokenizer import Tokenizer  # its from_pretrained maps "builtin" too

        kwargs.pop("use_fast", None)  # always the `tokenizers` library
        kwargs.pop("trust_remote_code", None)
        if kwargs.pop("padding_side", "left") != "left":
            raise ValueError("padding_side must be 'left': Mamba carries its state left to right")
        if kwargs:
            raise ValueError(f"{', '.join(sorted(kwargs))}: not supported by minimamba's Tokenizer.from_pretrained")
        return Tokenizer.from_pretrained(path_or_repo_id)


class TextGenerationPipeline:
    """transformers' text-generation pipeline: text in, [{"generated_text": ...}] out."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def __call__(self, text_inputs, max_new_tokens=20, return_full_text=True, **generate_kwargs):
        """A str -> [{"generated_text": str}]; a list of str -> one such list per prompt.

        Greedy by default, as transformers (do_sample=True, temperature, top_k, top_p, seed, ...
        go to `generate`); `max_new_tokens` defaults to transformers' 20.
        """
        from .pipeline import generate_text

        generate_kwargs.pop("return_tensors", None)
        texts = generate_text(text_inputs, model=self.model, tokenizer=self.tokenizer, max_new_tokens=max_new_tokens,
                              return_full_text=return_full_text, **generate_kwargs)
        if isinstance(text_inputs, str):
            return [{"generated_text": texts}]
        return [[{"generated_text": t}] for t in texts]


def pipeline(task="text-generation", model=None, tokenizer=None, **kwargs):
    """transformers.pipeline for task="text-generation": `model` a folder, Hub id, "builtin" (None) or a loaded model."""
    from .pipeline import load

    if task != "text-generation":
        raise ValueError(f"task {task!r} is not supported; minimamba's pipeline does 'text-generation'")
    options = _backend_kwargs(kwargs)
    unused = sorted({"revision", "cache_dir"} & set(options))
    if unused:  # load() reads a folder or the Hub cache as it is: never drop a setting without a word
        raise ValueError(f"{', '.join(unused)}: not supported by minimamba.pipeline; load the model first, "
                         f"e.g. AutoModelForCausalLM.from_pretrained(name, {unused[0]}=...), and pass model=it")
    model, tokenizer = load(model, tokenizer, dtype=options["dtype"], backend=options["backend"],
                            impl=options.get("impl"))
    return TextGenerationPipeline(model, tokenizer)
