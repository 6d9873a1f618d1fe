"""The zero-shot summary pairs runs item by item against the reference and the focus against the best peer."""

import pytest

from benchmarks.zeroshot_summary import merge_runs, render, summarise


def _run(piqa: list[int], lambada: list[int]) -> dict:
    def task(correct: list[int], norm: bool) -> dict:
        accuracy = sum(correct) / len(correct)
        return {"acc": accuracy, "acc_stderr": 0.1, "acc_norm": accuracy if norm else None,
                "acc_norm_stderr": 0.1 if norm else None, "n": len(correct), "split": "validation", "source": "x",
                "items": {"idx": list(range(len(correct))), "acc": correct, **({"acc_norm": correct} if norm else {})}}

    return {"model": "m", "zero_shot": {"tasks": {"piqa": task(piqa, True), "lambada": task(lambada, False)}}}


def test_paired_differences_against_the_reference_and_the_peer():
    dense = _run([1, 1, 1, 0], [1, 1, 0, 0])
    hywia = _run([1, 1, 0, 0], [1, 1, 1, 0])
    peer = _run([1, 0, 0, 0], [1, 0, 0, 0])
    summary = summarise({"dense": dense, "hywia": hywia, "peer": peer}, "hywia", "peer")
    assert [(p["a"], p["b"]) for p in summary["paired"]] == [("hywia", "dense"), ("peer", "dense"), ("hywia", "peer")]
    versus_peer = summary["paired"][2]
    assert versus_peer["tasks"]["piqa"]["difference"] == pytest.approx(0.25)
    assert versus_peer["tasks"]["lambada"]["only_a"] == 2 and versus_peer["tasks"]["lambada"]["only_b"] == 0
    assert summary["accuracy"]["hywia"]["piqa"]["metric"] == "acc_norm"
    assert summary["accuracy"]["hywia"]["lambada"]["metric"] == "acc"
    text = render(summary)
    assert "| `hywia` - `peer` |" in text and "piqa 4, lambada 4" in text


def test_runs_on_different_items_are_refused():
    dense = _run([1, 1, 1, 0], [1, 1, 0, 0])
    other = _run([1, 1, 1], [1, 1, 0])
    with pytest.raises(ValueError, match="different"):
        summarise({"dense": dense, "other": other}, None, None)


def test_evals_of_one_model_on_different_tasks_join_into_one_run():
    whole = _run([1, 0, 1, 0], [1, 1, 0, 0])
    piqa = {"model": "m", "zero_shot": {"tasks": {"piqa": whole["zero_shot"]["tasks"]["piqa"]}}}
    lambada = {"model": "m", "zero_shot": {"tasks": {"lambada": whole["zero_shot"]["tasks"]["lambada"]}}}
    assert merge_runs([piqa, lambada]) == whole
    with pytest.raises(ValueError, match="more than one"):
        merge_runs([piqa, piqa])


def test_a_chosen_task_list_sets_the_tasks_and_their_order():
    dense = _run([1, 1, 1, 0], [1, 1, 0, 0])
    hywia = _run([1, 1, 0, 0], [1, 0, 0, 0])
    summary = summarise({"dense": dense, "hywia": hywia}, None, None, ["lambada"])
    assert summary["tasks"] == ["lambada"]
    assert summary["paired"][0]["average"]["difference"] == pytest.approx(-0.25)
    assert list(summarise({"dense": dense}, None, None, ["lambada", "piqa"])["accuracy"]["dense"]) == ["lambada", "piqa"]
    with pytest.raises(ValueError, match="no result for boolq"):
        summarise({"dense": dense, "hywia": hywia}, None, None, ["piqa", "boolq"])
