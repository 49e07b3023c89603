"""minimamba: the Mamba selective state space model in readable NumPy.

    from minimamba import MambaForCausalLM
    model = MambaForCausalLM.from_pretrained("state-spaces/mamba-130m-hf")
    logits = model(input_ids).logits
"""

from .cache import MambaCache
from .config import MambaConfig
from .model import MambaCausalLMOutput, MambaForCausalLM, MambaModel, MambaOutput

__version__ = "0.1.0"

__all__ = ["MambaCache", "MambaConfig", "MambaForCausalLM", "MambaModel", "MambaOutput",
           "MambaCausalLMOutput", "__version__"]
