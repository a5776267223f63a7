"""`moetune lm-eval`: lm-evaluation-harness on the (PEFT-wrapped) model, with a local task YAML and
local data written here; its perplexity equals our own scoring of the same continuations."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import cli
from finetune.errors import MoetuneError
from finetune.evaluation.harness import run_lm_eval
from finetune.loading import load_model
from tests.helpers.runs import write_corpus, write_recipe

ROWS = [
    {"question": "def f():", "choices": ["return x", "while self", "import print"], "answer": 0},
    {"question": "x = value", "choices": ["(x, 3)", "else range", "in True"], "answer": 0},
    {"question": "for item in", "choices": ["range(item)", "class def", "yield None"], "answer": 0},
    {"question": "total =", "choices": ["print(total, 1)", "lambda as", "break try"], "answer": 0},
]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm-eval")
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "code_choice.yaml").write_text(
        "task: moetune_code_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'data.jsonl'}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_target: "{{choices[answer]}}"\n'
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
    )
    return folder / "code_choice.yaml"


@torch.no_grad()
def own_perplexity(model, tokenizer, rows) -> float:
    """The harness's loglikelihood perplexity: exp(-mean over documents of the summed log-probability of
    the answer's tokens right after the question (loglikelihood tasks join them without a delimiter))."""
    total = 0.0
    for row in rows:
        context = tokenizer.encode(row["question"])
        whole = tokenizer.encode(row["question"] + row["choices"][row["answer"]])
        logp = model(input_ids=torch.tensor([whole[:-1]])).logits.float().log_softmax(-1)[0]  # (T-1, V)
        total += sum(float(logp[p, whole[p + 1]]) for p in range(len(context) - 1, len(whole) - 1))
    return math.exp(-total / len(rows))


def test_lm_eval_scores_the_base_and_the_adapter_as_we_do(task, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="the optional extra moetune[lm-eval] (in the dev extra)")
    recipe = write_recipe(
        tmp_path, write_corpus(tmp_path / "t.jsonl", n=16), data={"eval_fraction": None, "max_length": 32},
        train={"max_steps": 3, "save_every": None, "lr": 1e-2},
    )  # fmt: skip
    assert cli.main(["train", str(recipe)]) == 0
    adapter = tmp_path / "run" / "adapter"
    capsys.readouterr()
    args = ["--tasks", str(task), "--bootstrap-iters", "0", "--json"]
    assert cli.main(["lm-eval", "preset:tiny", "--adapter", str(adapter), *args]) == 0
    tuned = json.loads(capsys.readouterr().out)  # the harness's own prints go to stderr
    base = run_lm_eval("preset:tiny", [str(task)], limit=4, bootstrap_iters=0)
    assert tuned["samples"] == {"moetune_code_choice": 4} and base.samples == {"moetune_code_choice": 4}

    from adapters import load_adapter

    model, tokenizer = load_model("preset:tiny")
    model.eval()
    expected_base = own_perplexity(model, tokenizer, ROWS)
    peft_model = load_adapter(model, adapter).eval()
    expected_tuned = own_perplexity(peft_model, tokenizer, ROWS)
    assert expected_tuned != pytest.approx(expected_base, rel=1e-3)  # the adapter changes the scores
    assert base.scores["moetune_code_choice"]["perplexity"] == pytest.approx(expected_base, rel=1e-4)
    assert tuned["scores"]["moetune_code_choice"]["perplexity"] == pytest.approx(expected_tuned, rel=1e-4)


def test_lm_eval_without_the_extra_says_how_to_install_it(task, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    with pytest.raises(MoetuneError, match=r"pip install 'moetune\[lm-eval\]'"):
        run_lm_eval("preset:tiny", [str(task)])
