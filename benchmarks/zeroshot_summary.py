"""Zero-shot runs of several models on the same items, compared pairwise (issue 17, goal 4).

Each input is the JSON of one `hywia eval --tasks ... --out RUN.json` on the same tasks, limit and seed; the first is
the reference (the dense model). The table gives each run's accuracy per task (acc_norm where lm-eval scores one)
with its standard error; the paired table gives, per task and on the tasks' average, every other run minus the
reference and `--focus` minus `--against` (the best peer), from the per-item differences. Writes
benchmarks/results/NAME.json and .md.

    hywia eval --model smollm2-135m --tasks piqa,arc_easy,lambada --limit none --out dense.json
    hywia eval --model pruned/ --tasks piqa,arc_easy,lambada --limit none --out hywia.json
    python benchmarks/zeroshot_summary.py dense=dense.json hywia=hywia.json peer=peer.json \
        --focus hywia --against peer --name zeroshot

A run may come from several evals of one model (NAME=a.json+b.json), e.g. the full small tasks in one and a
2000-item subset of HellaSwag in another: `--limit` is one value per eval. `--tasks` picks the tasks summarised and
their order (names, or a set of `hywia.eval.zeroshot.TASK_SETS` such as `paper`, the paper's seven, whose average
is the one papers quote); by default, every task of the reference run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hywia.eval.paired import paired_average, paired_difference, paired_metric
from hywia.eval.zeroshot import TASK_SETS

RESULTS = Path(__file__).resolve().parent / "results"


def _points(value: float, error: float | None) -> str:
    return f"{100 * value:.1f}" + ("" if error is None else f" ± {100 * error:.1f}")


def _difference(paired: dict) -> str:
    """Points ± stderr, bold where the difference is beyond twice its standard error."""
    text = _points(paired["difference"], paired["stderr"])
    resolved = paired["stderr"] is not None and abs(paired["difference"]) > 2 * paired["stderr"]
    return f"**{text}**" if resolved else text


def merge_runs(parts: list[dict]) -> dict:
    """One run from evals of the same model on different tasks (their zero-shot task tables joined)."""
    tasks: dict[str, dict] = {}
    for part in parts:
        for task, row in part["zero_shot"]["tasks"].items():
            if task in tasks:
                raise ValueError(f"task {task!r} is in more than one of the evals joined into one run")
            tasks[task] = row
    return {"model": parts[0].get("model"), "zero_shot": {"tasks": tasks}}


def summarise(runs: dict[str, dict], focus: str | None, against: str | None,
              tasks: list[str] | None = None) -> dict:
    """Per task (`tasks`, default: the first run's): each run's accuracy and stderr; paired differences against the
    first run, and focus - against."""
    names = list(runs)
    zero = {name: run["zero_shot"] for name, run in runs.items()}
    tasks = tasks or list(zero[names[0]]["tasks"])
    for name in names:
        missing = [task for task in tasks if task not in zero[name]["tasks"]]
        if missing:
            raise ValueError(f"run {name!r} has no result for {', '.join(missing)}")
    accuracy = {}
    for name in names:
        accuracy[name] = {}
        for task in tasks:
            row = zero[name]["tasks"][task]
            metric = paired_metric(row)
            accuracy[name][task] = {"metric": metric, "value": row[metric], "stderr": row[f"{metric}_stderr"],
                                    "n": row["n"]}
    pairs = [(name, names[0]) for name in names[1:]]
    if focus and against:
        pairs.append((focus, against))
    paired = [{"a": a, "b": b,
               "tasks": {task: paired_difference(zero[a], zero[b], task) for task in tasks},
               "average": paired_average(zero[a], zero[b], tasks)} for a, b in pairs]
    return {"tasks": tasks, "accuracy": accuracy, "paired": paired,
            "sources": {name: run.get("model") for name, run in runs.items()}}


def render(summary: dict) -> str:
    tasks, names = summary["tasks"], list(summary["accuracy"])
    first = summary["accuracy"][names[0]]
    lines = ["Accuracy in points ± standard error (acc_norm where lm-eval scores one, else acc); items per task: "
             + ", ".join(f"{task} {first[task]['n']}" for task in tasks) + ".", "",
             "| run | " + " | ".join(f"{t} ({first[t]['metric']})" for t in tasks) + " | average |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for name in names:
        row = summary["accuracy"][name]
        average = sum(row[t]["value"] for t in tasks) / len(tasks)
        lines.append(f"| `{name}` | " + " | ".join(_points(row[t]["value"], row[t]["stderr"]) for t in tasks)
                     + f" | {100 * average:.1f} |")
    lines += ["", "Paired differences (run a minus run b) in points ± the standard error of the per-item "
              "differences; bold: beyond twice that error. `only a / only b`: items just one of the two got right.", "",
              "| a - b | " + " | ".join(tasks) + " | average |", "|---|" + "---|" * (len(tasks) + 1)]
    for pair in summary["paired"]:
        cells = [f"{_difference(pair['tasks'][t])} ({pair['tasks'][t]['only_a']}/{pair['tasks'][t]['only_b']})"
                 for t in tasks]
        lines.append(f"| `{pair['a']}` - `{pair['b']}` | " + " | ".join(cells)
                     + f" | {_difference(pair['average'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=eval.json[+eval2.json...], the reference (dense) first")
    parser.add_argument("--focus", help="run compared with --against (e.g. hywia)")
    parser.add_argument("--against", help="the best peer")
    parser.add_argument("--name", default="zeroshot", help="results file stem under benchmarks/results")
    parser.add_argument("--tasks", help="tasks summarised, in order: comma-separated names or a task set "
                                        f"({', '.join(TASK_SETS)}); default: every task of the reference run")
    args = parser.parse_args()
    tasks = None
    if args.tasks:
        tasks = list(TASK_SETS.get(args.tasks, args.tasks.split(",")))
    runs = {}
    for item in args.runs:
        name, _, path = item.partition("=")
        if not path:
            parser.error(f"expected NAME=path.json, got {item!r}")
        runs[name] = merge_runs([json.loads(Path(part).read_text()) for part in path.split("+")])
    for name in (args.focus, args.against):
        if name and name not in runs:
            parser.error(f"{name!r} is not one of the runs ({', '.join(runs)})")
    try:
        summary = summarise(runs, args.focus, args.against, tasks)
    except ValueError as exc:
        parser.error(str(exc))
    text = render(summary)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
