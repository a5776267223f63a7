"""The built-in architecture as a transformers model; imports nothing else from the project."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

from .configuration_moetune import MoetuneConfig
from .configuration_moetune_multimodal import MoetuneMultimodalConfig
from .modeling_moetune import MoetuneForCausalLM, MoetuneModel
from .modeling_moetune_multimodal import MoetuneMultimodalForCausalLM
from .presets import PRESETS, preset_config
from .processing_moetune_multimodal import MoetuneMultimodalProcessor


def register() -> None:
    """Register the architecture with the Auto classes (idempotent)."""
    try:
        AutoConfig.register(MoetuneConfig.model_type, MoetuneConfig)
        AutoModel.register(MoetuneConfig, MoetuneModel)
        AutoModelForCausalLM.register(MoetuneConfig, MoetuneForCausalLM)
    except ValueError:  # already registered
        pass
    try:
        AutoConfig.register(MoetuneMultimodalConfig.model_type, MoetuneMultimodalConfig)
        AutoModelForCausalLM.register(MoetuneMultimodalConfig, MoetuneMultimodalForCausalLM)
        AutoProcessor.register(MoetuneMultimodalConfig, MoetuneMultimodalProcessor)
    except ValueError:  # already registered
        pass


register()

__all__ = [
    "PRESETS",
    "MoetuneConfig",
    "MoetuneForCausalLM",
    "MoetuneModel",
    "MoetuneMultimodalConfig",
    "MoetuneMultimodalForCausalLM",
    "MoetuneMultimodalProcessor",
    "preset_config",
    "register",
]
