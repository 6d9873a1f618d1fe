"""The bench's markdown: provenance (machine, model, texts, task subsets, command) next to one table.

The section sits between two marker comments so that rerunning the bench replaces only its own section of a
hand-edited BENCHMARKS.md.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..data.text import IN_DOMAIN_TEXTS
from ..eval.paired import paired_average, paired_difference
from ..io import write_text_atomic

BEGIN, END = "<!-- hywia-bench:quality:begin -->", "<!-- hywia-bench:quality:end -->"

TASK_TITLES = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
               "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA", "lambada": "LAMBADA"}
DEFAULT_LABEL = "hywia"  # the run that is compared with the best other run at its ratio
_PLOT_TITLES = {"widths": "kept heads and MLP channels per layer",
                "agreement": "fine- vs coarse-grained rank agreement per layer",
                "alpha": "learned fusion weight of each view per layer"}


def shown_accuracy(row: dict) -> tuple[float, float | None]:
    """(accuracy, its stderr) as the table shows it: acc_norm where lm-eval reports one, acc otherwise."""
    if row["acc_norm"] is not None:
        return row["acc_norm"], row["acc_norm_stderr"]
    return row["acc"], row["acc_stderr"]


def _is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _ppl(value: float | None) -> str:
    return f"{value:.2f}" if _is_finite(value) else "diverged"


def in_domain_texts(record: dict) -> list[str]:
    """The measured texts that are the calibration source's own held-out parts: reported, never judged on."""
    source = record["settings"]["calibration"].get("source")
    own = IN_DOMAIN_TEXTS.get(source, (source,))
    return [text for text in record["settings"]["ppl_texts"] if text in own]


def cross_domain_texts(record: dict) -> list[str]:
    """The texts a method is judged on: every measured text but the in-domain ones."""
    return [text for text in record["settings"]["ppl_texts"] if text not in in_domain_texts(record)]


def cross_gm(evaluation: dict, texts: list[str]) -> float | None:
    """Geometric mean of the perplexities on `texts` (None when one diverged): the cross-domain figure of merit."""
    values = [evaluation["perplexity"][text]["ppl"] for text in texts]
    if not values or not all(_is_finite(value) for value in values):
        return None
    return math.exp(sum(math.log(value) for value in values) / len(values))


def _extra_average(zero: dict) -> str | None:
    """The separating set's average when it ran and is not already the headline average (which is the paper's
    seven whenever those all ran): shown in a column of its own."""
    separating = zero.get("averages", {}).get("separating")
    if separating is None or separating["tasks"] == zero.get("average_tasks"):
        return None
    return "separating"


def ranking_average(zero: dict) -> tuple[str, list[str], float]:
    """(name, tasks, value) of the average that picks the best run: the separating set's when it ran (its tasks
    are the ones a small dense model scores above chance on), else the headline average."""
    separating = zero.get("averages", {}).get("separating")
    if separating is not None:
        return "separating average", separating["tasks"], separating["acc_norm"]
    return "average", zero.get("average_tasks", list(zero["tasks"])), zero["average_acc_norm"]


def _row(name: str, ratio: str, evaluation: dict, texts: list[str], tasks: list[str], cost: list[str],
         judged: list[str]) -> list[str]:
    cells = [name, ratio, f"{evaluation['params'] / 1e6:.1f}M"]
    cells += [_ppl(evaluation["perplexity"][text]["ppl"]) for text in texts]
    if len(judged) > 1:
        cells.append(_ppl(cross_gm(evaluation, judged)))
    zero = evaluation["zero_shot"]
    if zero:
        cells += [f"{100 * shown_accuracy(zero['tasks'][task])[0]:.1f}" for task in tasks]
        cells.append(f"{100 * zero['average_acc_norm']:.1f}")
        if _extra_average(zero):
            cells.append(f"{100 * zero['averages'][_extra_average(zero)]['acc_norm']:.1f}")
    return cells + cost


def _table(record: dict) -> list[str]:
    texts, tasks = record["settings"]["ppl_texts"], record["settings"]["tasks"]
    own, judged = in_domain_texts(record), cross_domain_texts(record)
    header = ["criterion", "ratio", "params"] + [f"ppl {text}" + (" (in-domain)" if text in own else "")
                                                 for text in texts]
    if len(judged) > 1:
        header.append("cross gm")
    zero = record["dense"]["zero_shot"]
    if tasks:
        paper = zero.get("averages", {}).get("paper")
        header += [TASK_TITLES[task] for task in tasks]
        header.append("paper average" if paper and len(tasks) > len(paper["tasks"]) else "average")
        if _extra_average(zero):
            header.append("separating average")
    header += ["prune s", "peak MB"]
    rows = [_row("dense", "0", record["dense"], texts, tasks, ["", ""], judged)]
    for run in record["runs"]:
        ratio = f"{run['ratio']:g} ({run['report']['ratio_achieved']:.3f})"
        cost = [f"{run['prune_seconds']:.0f}", f"{run['memory']['peak_rss_mb']:.0f}"]
        rows.append(_row(f"`{run['label']}`", ratio, run["eval"], texts, tasks, cost, judged))
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _standard_errors(record: dict) -> str:
    """How much of a difference the task subsets can resolve, from the dense model's stderrs."""
    zero = record["dense"]["zero_shot"]
    errors = [shown_accuracy(row)[1] for row in zero["tasks"].values()]
    errors = [e for e in errors if e is not None]
    if not errors:
        return ""
    per_task = sum(errors) / len(errors)
    averaged = [shown_accuracy(zero["tasks"][task])[1] for task in zero.get("average_tasks", zero["tasks"])]
    average = math.sqrt(sum(e * e for e in averaged if e is not None)) / len(averaged)
    paired = all("items" in row for row in zero["tasks"].values())
    return (f" One standard error is about ±{100 * per_task:.1f} points per task and ±{100 * average:.1f} on the "
            "average: " + ("the paired differences below compare two runs more finely." if paired else
                           "smaller differences are noise."))


def _averages_note(zero: dict) -> str:
    """What the average columns cover: the paper's seven tasks whenever they all ran, else every task shown."""
    paper = zero.get("averages", {}).get("paper")
    note = ("average = the mean of the paper's seven tasks (LAMBADA not included)." if paper and
            len(zero["tasks"]) > len(paper["tasks"]) else "average = their mean.")
    if "lambada" in zero["tasks"]:
        note += (" LAMBADA = last-word accuracy (lm-eval's lambada_openai) on the held-out LAMBADA passages, which "
                 "calibration never reads.")
    if _extra_average(zero):
        titles = ", ".join(TASK_TITLES[task] for task in zero["averages"]["separating"]["tasks"])
        note += f" Separating average = the mean of {titles}."
    return note


def _winners(record: dict) -> list[str]:
    """Per ratio, which entry has the best average accuracy and the lowest perplexity off the calibration source
    (the geometric mean over the judged texts when there are several)."""
    lines = []
    judged = cross_domain_texts(record)
    for ratio in dict.fromkeys(run["ratio"] for run in record["runs"]):
        runs = [run for run in record["runs"] if run["ratio"] == ratio]
        parts = []
        if record["settings"]["tasks"]:
            best = max(runs, key=lambda run: ranking_average(run["eval"]["zero_shot"])[2])
            name, _, value = ranking_average(best["eval"]["zero_shot"])
            parts.append(f"best {name} accuracy `{best['label']}` ({100 * value:.1f})")
        if judged:
            name = "cross-domain geometric-mean" if len(judged) > 1 else judged[0]
            finite = [run for run in runs if cross_gm(run["eval"], judged) is not None]
            if finite:
                best = min(finite, key=lambda run: cross_gm(run["eval"], judged))
                parts.append(f"lowest {name} perplexity `{best['label']}` ({cross_gm(best['eval'], judged):.2f})")
        if parts:
            lines.append(f"- ratio {ratio:g}: " + "; ".join(parts))
    return lines


def _points(paired: dict) -> str:
    """A paired difference in points of accuracy ± its stderr, bold when beyond twice the stderr."""
    error = paired["stderr"]
    text = f"{100 * paired['difference']:+.1f}" + ("" if error is None else f" ± {100 * error:.1f}")
    resolved = error is not None and abs(paired["difference"]) > 2 * error
    return f"**{text}**" if resolved else text


def _comparisons(record: dict) -> list[tuple[float, str, dict, dict]]:
    """(ratio, name, run's zero-shot, reference's zero-shot): each run against the dense model, and the default run
    against the best other run of its ratio (by `ranking_average`)."""
    dense = record["dense"]["zero_shot"]
    pairs = []
    for ratio in dict.fromkeys(run["ratio"] for run in record["runs"]):
        runs = [run for run in record["runs"] if run["ratio"] == ratio]
        pairs += [(ratio, f"`{run['label']}` − dense", run["eval"]["zero_shot"], dense) for run in runs]
        default = next((run for run in runs if run["label"] == DEFAULT_LABEL), None)
        others = [run for run in runs if run is not default]
        if default is not None and others:
            best = max(others, key=lambda run: ranking_average(run["eval"]["zero_shot"])[2])
            pairs.append((ratio, f"`{default['label']}` − best other `{best['label']}`",
                          default["eval"]["zero_shot"], best["eval"]["zero_shot"]))
    return pairs


def _paired_table(record: dict) -> list[str]:
    """Per ratio, paired differences per task and on the ranking average, with what they can resolve; nothing
    for records without per-item results (benches before they were kept)."""
    dense = record["dense"]["zero_shot"]
    tasks = record["settings"]["tasks"]
    if not tasks or not record["runs"] or not all("items" in dense["tasks"][task] for task in tasks):
        return []
    average_name, average_tasks, _ = ranking_average(dense)
    rows, task_errors, average_errors = [], [], []
    for ratio, name, run, reference in _comparisons(record):
        cells = [paired_difference(run, reference, task) for task in tasks]
        average = paired_average(run, reference, average_tasks)
        task_errors += [cell["stderr"] for cell in cells if cell["stderr"] is not None]
        if average["stderr"] is not None:
            average_errors.append(average["stderr"])
        rows.append([name, f"{ratio:g}"] + [_points(cell) for cell in cells] + [_points(average)])
    header = (["comparison", "ratio"] + [f"{TASK_TITLES[task]} (n={dense['tasks'][task]['n']})" for task in tasks]
              + [f"{average_name} ({len(average_tasks)} tasks)"])
    lines = ["Paired accuracy differences in points (run minus reference, on the same items; acc_norm where lm-eval "
             "reports it, acc otherwise), ± one standard error of the per-item differences; **bold** where the "
             "difference exceeds twice its standard error. The average column is the mean of its tasks' "
             "differences (tasks counted as independent). The best other run is the one with the highest "
             f"{average_name} at that ratio.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if task_errors:
        resolvable = (f"With these items a difference of about {200 * _median(task_errors):.1f} points on one task "
                      "(twice the median standard error above)")
        if average_errors:
            resolvable += f" and {200 * _median(average_errors):.1f} points on the {average_name}"
        lines += ["", resolvable + " is resolvable; smaller ones are noise."]
    return lines


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _stage_table(record: dict) -> list[str]:
    """Seconds and peak resident MB of every stage: the shared calibration pass, then each run's own stages."""
    stages = ["calibrate"] + list(dict.fromkeys(name for run in record["runs"]
                                                for name in run["report"].get("stages", {})))
    if len(stages) == 1:
        return []

    def cell(entry: dict | None) -> str:
        if entry is None:
            return ""
        cpu = f" ({entry['cpu_seconds']:.1f} CPU s)" if "cpu_seconds" in entry else ""
        return f"{entry['seconds']:.1f} s{cpu} / {entry['peak_rss_mb']:.0f} MB"

    rows = [[f"calibration pass ({entry['samples']} windows, layers {entry['layers'] or 'default'})", "",
             cell(entry)] + [""] * (len(stages) - 1) for entry in record.get("calibration_passes", [])]
    rows += [[f"`{run['label']}`", f"{run['ratio']:g}"] + [cell(run["report"].get("stages", {}).get(name))
                                                            for name in stages] for run in record["runs"]]
    header = ["run", "ratio", *stages]
    return ["Cost per stage (wall seconds, the process's CPU seconds in brackets / peak resident MB within the stage; "
            "one calibration pass serves every run "
            "of its layer range):", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def render_markdown(record: dict, base: Path) -> str:
    """The section for a markdown file in folder `base` (plot links are relative to it)."""
    settings, dense = record["settings"], record["dense"]
    machine = record["machine"]
    calibration = settings["calibration"]
    lines = [BEGIN, "## Quality: pruning criteria side by side", ""]
    lines.append(f"- **Model**: {record['model']}, {dense['params'] / 1e6:.1f}M parameters.")
    load = "" if "load_average_end" not in record else (
        f"; load average {record['load_average_start'][0]:.1f} at start, {record['load_average_end'][0]:.1f} at end; "
        f"the whole bench took {record['seconds'] / 60:.0f} min")
    lines.append(f"- **Machine**: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch "
                 f"thread(s){', ' + machine['gpu'] if 'gpu' in machine else ''}; torch {machine['torch']}, "
                 f"transformers {machine['transformers']}, lm-eval {machine['lm_eval']}, hywia {machine['hywia']}"
                 f"{load}. Seconds are wall-clock.")
    lines.append(f"- **Calibration** (the same windows for every run): {calibration['samples']} windows x "
                 f"{calibration['seq_len']} tokens of {calibration['text']}, seed {calibration['seed']}."
                 + (f" Prune options for every run: `{settings['prune_kwargs']}`." if settings["prune_kwargs"] else ""))
    for text, row in dense["perplexity"].items():
        described = "" if row["description"] == text else f"{row['description']}; "
        lines.append(f"- **Perplexity `{text}`**: {described}first {row['tokens']} tokens, "
                     f"{row['windows']} non-overlapping windows of {row['seq_len']}.")
    zero = dense["zero_shot"]
    if zero:
        subsets = ", ".join(f"{TASK_TITLES[t]} {r['n']} ({r['split']}, v{r['version']})"
                            for t, r in zero["tasks"].items())
        scope = "the full splits" if settings["limit"] is None else f"fixed subsets chosen by seed {settings['seed']}"
        lines.append(f"- **Zero-shot tasks** (lm-eval {zero['lm_eval_version']}, 0-shot, {scope}): {subsets}. "
                     "Accuracy in %, acc_norm where lm-eval reports it, acc otherwise (BoolQ, WinoGrande, "
                     "LAMBADA); " + _averages_note(zero) + _standard_errors(record))
    lines.append("- **Columns**: ratio = requested (achieved share of decoder parameters removed); prune s = "
                 "wall seconds of scoring, planning, compensation and surgery (the calibration pass, shared by the runs "
                 "of one layer range, is `calibration_passes` in bench.json); peak MB = the process's peak resident "
                 "memory during that prune, the bench's in-memory dense copy included. bench.json also "
                 "holds CPU seconds (`prune_cpu_seconds`, `eval.cpu_seconds`), the steadier measure on a shared "
                 "machine.")
    if record.get("command"):
        lines.append(f"- **Command**: `{record['command']}`")
    lines += ["", *_table(record), ""]
    winners = _winners(record)
    if winners:
        lines += ["Per ratio:", "", *winners, ""]
    paired = _paired_table(record)
    if paired:
        lines += [*paired, ""]
    stages = _stage_table(record)
    if stages:
        lines += [*stages, ""]
    for name, path in record.get("plots", {}).items():
        link = Path(os.path.relpath(path, base)).as_posix()
        lines.append(f"![{_PLOT_TITLES[name]}]({link})")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, section: str) -> None:
    """Replace the bench's section of `path` (between the markers), append it, or create the file."""
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        start, stop = text.find(BEGIN), text.find(END)
        if start >= 0 and stop > start:
            text = text[:start] + section.rstrip("\n") + text[stop + len(END):]
        else:
            text = text.rstrip("\n") + "\n\n" + section
    else:
        text = section
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
