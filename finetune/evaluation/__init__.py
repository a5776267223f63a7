"""Evaluation beyond the loss: task metrics in runs and outside them (`moetune evaluate`).

- metrics.py  the metric functions on predictions / references (exact match, word accuracy,
              macro-F1, recall@1), tested against hand-computed cases
- tasks.py    a model on collated eval batches -> those metrics (generation, classification head,
              retrieval)
- runs.py     what a training run measures before, at every `train.eval_every` and after
              (held-out loss, `eval.metrics`, `data.retain` loss); the loop calls it, it never trains
- command.py  `moetune evaluate`: the same measurements on a MODEL (+ adapter) and a data source
- sweep.py    `moetune sweep`: one run per grid point (resumable), the gain vs trainable-share table and
              curve, the smallest budget reaching 92% of the best gain
- harness.py  `moetune lm-eval`: lm-evaluation-harness on the model + adapter (optional extra)
- esft.py     ESFT in one recipe (`adapter.experts: {threshold: P}`): profile the loaded base, select the
              experts per layer, write selection.json + selection.png in the run folder

The held-out loss and the routing statistics stay in finetune/evaluate.py.
"""

from finetune.evaluation.metrics import METRICS

__all__ = ["METRICS"]
