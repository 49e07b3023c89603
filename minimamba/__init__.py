"""minimamba: the Mamba selective state space model in readable NumPy.

    from minimamba import MambaForCausalLM
    model = MambaForCausalLM.from_pretrained("state-spaces/mamba-130m-hf")
    logits = model(input_ids).logits

    import minimamba
    print(minimamba.generate_text("ROMEO:", max_new_tokens=40))   # the built-in model
    minimamba.tune_threads()   # opt-in: faster prefill with the Numba kernels on few cores

Importing minimamba sets no environment variable and starts no thread pool.
"""

import os
import sys


def _quiet_interrupt(hook):
    def excepthook(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt):
            print("\ninterrupted", file=sys.stderr)  # the exit status stays that of SIGINT
        else:
            hook(kind, value, traceback)
    return excepthook


if os.path.basename(sys.argv[0] if sys.argv else "") == "minimamba":  # the `minimamba` command: a Ctrl-C
    sys.excepthook = _quiet_interrupt(sys.excepthook)  # while it loads NumPy & co prints no traceback

from .auto import AutoModel, AutoModelForCausalLM, AutoTokenizer
from .cache import MambaCache
from .config import MambaConfig
from .generation import generate, left_pad
from .model import MambaCausalLMOutput, MambaForCausalLM, MambaModel, MambaOutput
from .pipeline import generate_text
from .auto import pipeline  # noqa: E402 - after the submodule of the same name, so the name is the function
from .threads import tune_threads
from .tokenizer import Tokenizer

# The small model shipped with the package (config.json, model.safetensors, tokenizer.json).
BUILTIN_MODEL_DIR = os.path.join(os.path.dirname(__file__), "builtin")

__version__ = "0.1.0"

__all__ = ["MambaCache", "MambaConfig", "MambaForCausalLM", "MambaModel", "MambaOutput",
           "MambaCausalLMOutput", "Tokenizer", "generate", "generate_text", "left_pad", "BUILTIN_MODEL_DIR",
           "pipeline", "AutoModel", "AutoModelForCausalLM", "AutoTokenizer", "tune_threads", "__version__"]
