"""Paired comparison of two zero-shot runs on the same items.

Two pruned models answer the same questions, and most items are easy or hard for both: comparing their accuracies
as if independent counts the items' own spread twice. The per-item differences (-1, 0, +1) cancel it: the more
items two runs agree on, the smaller the standard error of their mean, at the same number of items.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of a mean: sample standard deviation (n - 1) / sqrt(n), lm-eval's formula for acc."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def paired_metric(row: dict[str, Any]) -> str:
    """The metric a task is compared on: acc_norm where lm-eval scores one, acc otherwise (as the bench shows)."""
    return "acc" if row["acc_norm"] is None else "acc_norm"


def paired_difference(a: dict, b: dict, task: str) -> dict[str, Any]:
    """Accuracy of run ``a`` minus run ``b`` on ``task``, paired item by item (two ``zero_shot`` results).

    Both runs answered the same items, so the per-item differences (-1, 0, +1) cancel the items' own difficulty:
    the standard error is their sample standard deviation / sqrt(n), far below that of two independent accuracies
    when the runs agree on most items. ``only_a`` / ``only_b`` count the items just one of them got right.
    Raises ValueError when the runs did not score the same items (another split, limit or seed).
    """
    rows = [run["tasks"].get(task) for run in (a, b)]
    if any(row is None or "items" not in row for row in rows):
        raise ValueError(f"task {task!r} has no per-item results in both runs")
    row_a, row_b = rows
    if (row_a["split"], row_a["source"]) != (row_b["split"], row_b["source"]) or \
            row_a["items"]["idx"] != row_b["items"]["idx"]:
        raise ValueError(f"the two runs scored different {task} items: pair runs of the same --limit and --seed")
    metric = paired_metric(row_a)
    if metric not in row_a["items"] or metric not in row_b["items"]:
        raise ValueError(f"task {task!r} has no per-item {metric} in both runs")
    diffs = [x - y for x, y in zip(row_a["items"][metric], row_b["items"][metric], strict=True)]
    if not diffs:
        raise ValueError(f"task {task!r} has no items")
    return {
        "task": task,
        "metric": metric,
        "n": len(diffs),
        "difference": sum(diffs) / len(diffs),
        "stderr": mean_stderr(diffs),
        "only_a": diffs.count(1),
        "only_b": diffs.count(-1),
    }


def paired_average(a: dict, b: dict, tasks: Sequence[str]) -> dict[str, Any]:
    """The paired difference of the tasks' average accuracy: the mean of the per-task differences, with the
    standard error of independent tasks (sqrt of the summed squared stderrs / number of tasks)."""
    if not tasks:
        raise ValueError("paired_average needs at least one task")
    parts = [paired_difference(a, b, task) for task in tasks]
    stderrs = [part["stderr"] for part in parts]
    return {
        "tasks": list(tasks),
        "n": sum(part["n"] for part in parts),
        "difference": sum(part["difference"] for part in parts) / len(parts),
        "stderr": None if None in stderrs else math.sqrt(sum(e * e for e in stderrs)) / len(parts),
    }
