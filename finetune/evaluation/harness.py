"""`moetune lm-eval`: lm-evaluation-harness on a MODEL, optionally with an adapter (the optional extra
`moetune[lm-eval]`: `pip install 'moetune[lm-eval]'`).

The model is loaded as everywhere else (`finetune.loading.load_model`: presets, folders, hub ids,
quantized experts) and an adapter is attached with `adapters.load_adapter` (PEFT, with moetune's fast
routed-expert path); the harness gets that model object through its `HFLM` wrapper, so what it scores
is exactly what `moetune generate` and `evaluate` run. `--tasks` takes harness task names and/or
task YAML files (or folders of them): their folders are added to the harness's task search path and
each file's `task:` is run, so a task with local data files needs no hub access.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import MoetuneError


@dataclass
class HarnessResult:
    """Scores per task; `str()` is the table `moetune lm-eval` prints, `as_dict()` its --json."""

    model: str
    adapter: str | None
    scores: dict[str, dict[str, float]]  # task -> {"acc": .., "acc_stderr": ..}
    samples: dict[str, int]  # task -> documents evaluated

    def __str__(self) -> str:
        what = self.model + (f" + {self.adapter}" if self.adapter else "")
        lines = [
            f"lm-evaluation-harness on {what}",
            "| task | metric | value | stderr | docs |",
            "| --- | --- | --- | --- | --- |",
        ]
        for task, values in self.scores.items():
            for metric, value in values.items():
                if metric.endswith("_stderr"):
                    continue
                err = values.get(f"{metric}_stderr")
                shown = f"{err:.4f}" if isinstance(err, float) and math.isfinite(err) else "-"
                lines.append(f"| {task} | {metric} | {value:.4f} | {shown} | {self.samples.get(task, '-')} |")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _tasks_and_paths(tasks: list[str]) -> tuple[list[str], list[str], bool]:
    """(task names, folders to search, whether any name is the harness's own): a YAML file gives its
    `task:` and its folder; a folder, its YAMLs."""
    import yaml

    names, paths, builtin = [], [], False
    for item in tasks:
        path = Path(item).expanduser()
        if path.suffix in (".yaml", ".yml") or path.is_dir():
            if not path.exists():
                raise MoetuneError(f"--tasks {item}: no such file or folder")
            files = sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
            for file in files:
                config = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
                if not isinstance(config, dict) or not isinstance(config.get("task"), str):
                    raise MoetuneError(f"{file}: a harness task YAML names its task (`task: NAME`)")
                names.append(config["task"])
            paths.append(str(path if path.is_dir() else path.parent))
        else:
            names.append(item)
            builtin = True
    return names, paths, builtin


def run_lm_eval(
    model: str,
    tasks: list[str],
    *,
    adapter: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    bootstrap_iters: int = 100000,
    quantize: str | None = None,
    trust_remote_code: bool = False,
) -> HarnessResult:
    """Run lm-evaluation-harness `tasks` (names or YAML files) on `model` (+ `adapter`).

    `bootstrap_iters`: the harness's resamples for the standard errors (its default; 0 skips them)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise MoetuneError(
            f"moetune lm-eval needs lm-evaluation-harness ({err.name} is missing); pip install 'moetune[lm-eval]'"
        ) from None
    from finetune.loading import load_model

    if not tasks:
        raise MoetuneError("--tasks is empty; give harness task names or task YAML files")
    if limit is not None and limit < 1:
        raise MoetuneError(f"--limit must be >= 1, got {limit}")
    names, paths, builtin = _tasks_and_paths(tasks)
    net, tokenizer = load_model(model, quantize=quantize, trust_remote_code=trust_remote_code)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a multimodal processor: its decoder's tokenizer
    if tokenizer is None:
        raise MoetuneError(f"{model}: no tokenizer found next to the model; lm-eval needs one")
    if adapter is not None:
        from adapters import load_adapter

        net = load_adapter(net, adapter, base=model)
    net.eval()
    # Only YAML files given: the harness's thousands of own tasks are not indexed (seconds saved).
    manager = TaskManager(include_path=paths or None, include_defaults=builtin)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise MoetuneError(
            f"--tasks: unknown harness task(s) {', '.join(unknown)}; give a task YAML file, or see "
            "`lm-eval ls tasks`"
        )
    lm = HFLM(pretrained=net, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
    with contextlib.redirect_stdout(
        sys.stderr
    ):  # the harness prints progress notes: keep stdout for the result
        output = simple_evaluate(
            model=lm, tasks=names, task_manager=manager, limit=limit, bootstrap_iters=bootstrap_iters
        )
    scores: dict[str, dict[str, float]] = {}
    for task, values in output["results"].items():
        scores[task] = {
            key.split(",")[0]: float(value)
            for key, value in values.items()
            if "," in key and isinstance(value, int | float) and not isinstance(value, bool)
        }
    samples = {
        task: int(n.get("effective", n.get("original", 0))) for task, n in output.get("n-samples", {}).items()
    }
    return HarnessResult(model=model, adapter=adapter, scores=scores, samples=samples)
