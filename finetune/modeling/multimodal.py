"""The multimodal model's old import path, kept so `finetune.modeling.multimodal.X` keeps working.

The code follows transformers' split: `configuration_moetune_multimodal.py` (the config and presets),
`modeling_moetune_multimodal.py` (the model) and `processing_moetune_multimodal.py` (the processor).
Saved folders name their classes by model_type / class name (AutoConfig, AutoModelForCausalLM and
AutoProcessor registrations in `finetune.modeling`), so folders written before the split load as
before; a pickled config resolves through the names here.
"""

from .configuration_moetune_multimodal import MULTIMODAL_PRESETS, MoetuneMultimodalConfig, multimodal_config
from .modeling_moetune_multimodal import (
    MoetuneContrastive,
    MoetuneFusionGate,
    MoetuneMultimodalForCausalLM,
    MoetuneMultimodalOutput,
    MoetuneProjector,
    MultimodalEncoding,
    describe_encoders,
    symmetric_info_nce,
)
from .processing_moetune_multimodal import (
    MoetuneMultimodalProcessor,
    build_processor,
    prepare_multimodal_inputs,
)

__all__ = [
    "MULTIMODAL_PRESETS",
    "MoetuneContrastive",
    "MoetuneFusionGate",
    "MoetuneMultimodalConfig",
    "MoetuneMultimodalForCausalLM",
    "MoetuneMultimodalOutput",
    "MoetuneMultimodalProcessor",
    "MoetuneProjector",
    "MultimodalEncoding",
    "build_processor",
    "describe_encoders",
    "multimodal_config",
    "prepare_multimodal_inputs",
    "symmetric_info_nce",
]
