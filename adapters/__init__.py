"""LoRA adapters for Mixture-of-Experts models, model-agnostic (any transformers MoE family).

Public API:
- `apply_lora(model, *, targets, r, alpha, ...)` -> `peft.PeftModel` with the fast routed expert path;
- `load_adapter(model, folder, is_trainable=False)` -> `peft.PeftModel` (moetune's or plain PEFT's adapter);
- `count_target_groups(model)` / `target_report(peft_model)`: what can be / was adapted, per group;
- `select_experts(scores, threshold)` / `load_selection(path_or_mapping)`: ESFT expert selection;
- `export_adapter(adapter_dir, output, fmt="per-expert")`: one LoRA pair per expert, for serving stacks.
"""

from adapters.errors import MoetuneError
from adapters.experts import fast_path_modules, install_fast_path, remove_fast_path
from adapters.export import export_adapter
from adapters.inject import apply_lora, load_adapter
from adapters.selection import load_selection, select_experts
from adapters.targets import GROUPS, count_target_groups, target_report

__all__ = [
    "GROUPS",
    "MoetuneError",
    "apply_lora",
    "count_target_groups",
    "export_adapter",
    "fast_path_modules",
    "install_fast_path",
    "load_adapter",
    "load_selection",
    "remove_fast_path",
    "select_experts",
    "target_report",
]
