"""minimamba: the Mamba selective state space model in readable NumPy.

    from minimamba import MambaForCausalLM
    model = MambaForCausalLM.from_pretrained("state-spaces/mamba-130m-hf")
    logits = model(input_ids).logits

    import minimamba
    print(minimamba.generate_text("ROMEO:", max_new_tokens=40))   # the built-in model
"""

import os

from . import threads  # first: sets the thread-pool spins before NumPy loads OpenBLAS
from .cache import MambaCache
from .config import MambaConfig
from .generation import generate, left_pad
from .model import MambaCausalLMOutput, MambaForCausalLM, MambaModel, MambaOutput
from .pipeline import generate_text
from .tokenizer import Tokenizer

# The small model shipped with the package (config.json, model.safetensors, tokenizer.json).
BUILTIN_MODEL_DIR = os.path.join(os.path.dirname(__file__), "builtin")

__version__ = "0.1.0"

__all__ = ["MambaCache", "MambaConfig", "MambaForCausalLM", "MambaModel", "MambaOutput",
           "MambaCausalLMOutput", "Tokenizer", "generate", "generate_text", "left_pad", "BUILTIN_MODEL_DIR",
           "__version__"]
