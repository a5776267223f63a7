"""LoRA adapters for Mixture-of-Experts models, model-agnostic (any transformers MoE family).

Public API (imported lazily, so `import adapters` stays cheap for the CLI):
- `apply_lora(model, *, targets, r, alpha, ...)` -> `peft.PeftModel` with the fast routed expert path;
- `load_adapter(model, folder, is_trainable=False, base=None)` -> `peft.PeftModel` (moetune's or plain
  PEFT's adapter; its recorded base is compared with `base`, see `adapters.provenance`);
- `count_target_groups(model)` / `target_report(peft_model)`: what can be / was adapted, per group;
- `select_experts(scores, threshold)` / `load_selection(path_or_mapping)`: ESFT expert selection;
- `export_adapter(adapter_dir, output, fmt="per-expert")` -> `ExportReport`: per-expert storage or a
  vLLM / SGLang layout;
- `install_fast_path` / `remove_fast_path` / `fast_path_modules`: switch the routed expert path.
"""

import logging
from importlib import import_module

from adapters.errors import MoetuneError

# PEFT imports bitsandbytes when it is installed; bitsandbytes then logs, on every import, that an
# optional CPU gemv kernel package is missing. moetune never calls that kernel (it dequantizes whole
# experts), so that line is noise for our users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_LAZY = {
    "apply_lora": "adapters.inject",
    "load_adapter": "adapters.inject",
    "count_target_groups": "adapters.targets",
    "target_report": "adapters.targets",
    "GROUPS": "adapters.targets",
    "select_experts": "adapters.selection",
    "load_selection": "adapters.selection",
    "export_adapter": "adapters.export",
    "install_fast_path": "adapters.expert_fast_path",
    "remove_fast_path": "adapters.expert_fast_path",
    "fast_path_modules": "adapters.expert_fast_path",
}

__all__ = ["MoetuneError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adapters' has no attribute {name!r}")
