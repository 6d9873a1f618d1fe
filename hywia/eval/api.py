"""`hywia.evaluate`: perplexity on named texts plus zero-shot accuracy, as one JSON-able record.

The record carries what is needed to compare numbers across runs and machines: the text and token count of every
perplexity, the lm-eval version, each task's version, split and item count, the seed of the task subsets.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from collections.abc import Sequence

import torch
from torch import nn

from ..measure import count_params
from ..data.text import check_seq_len_fits, check_text_source, check_window_sizes
from ..errors import InvalidRequestError
from ..io import describe, load_model
from .perplexity import heldout_windows, perplexity


def parse_list(values: str | Sequence[str] | None) -> list[str]:
    """Flatten `"a,b"` or `["a,b", "c"]` into `["a", "b", "c"]`, dropping empty entries."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """Task names from a comma list of tasks and task sets (`all`, `paper`, `separating`), or `none`: each task
    once, in the order given."""
    from .zeroshot import TASK_SETS, TASKS  # lm-eval's stack loads only when tasks are asked for

    names = parse_list(spec)
    if names in ([], ["none"]):
        return []
    unknown = [name for name in names if name not in TASKS and name not in TASK_SETS]
    if unknown:
        raise InvalidRequestError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}, "
                                  f"{', '.join(TASK_SETS)}, none")
    return list(dict.fromkeys(task for name in names for task in TASK_SETS.get(name, (name,))))


def parse_texts(spec: str | Sequence[str] | None) -> list[str]:
    """Perplexity text names (`lambada`, `coqa`, or a file), `none` meaning no perplexity."""
    names = parse_list(spec)
    return [] if names == ["none"] else names


def machine() -> dict:
    """The CPU, core count and library versions: numbers from this toolkit are only comparable on the same setup."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    for package in ("hywia", "torch", "transformers", "lm_eval"):
        info[package] = importlib.metadata.version(package)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def perplexities(
    model: nn.Module, tokenizer, texts: Sequence[str], seq_len: int = 128, max_tokens: int = 16384
) -> dict[str, dict]:
    """Perplexity on each text over non-overlapping `seq_len` windows of its first `max_tokens` tokens."""
    results = {}
    for text in texts:
        started = time.perf_counter()
        description, windows = heldout_windows(tokenizer, text, seq_len, max_tokens)
        results[text] = {
            "ppl": perplexity(model, windows),
            "description": description,
            "tokens": int(windows.numel()),
            "windows": int(windows.shape[0]),
            "seq_len": seq_len,
            "seconds": round(time.perf_counter() - started, 2),
        }
    return results


def evaluate(
    model: str | nn.Module | None = None,
    tokenizer=None,
    *,
    ppl_texts: str | Sequence[str] = ("lambada",),
    tasks: str | Sequence[str] = "all",
    limit: int | None = None,
    seed: int = 0,
    seq_len: int = 128,
    ppl_tokens: int = 16384,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> dict:
    """Perplexity on `ppl_texts` and zero-shot accuracy on `tasks` of a live model (with its tokenizer), a folder
    or a name (None = the embedded default).

    `limit` evaluates a fixed subset of that many items per task, chosen by `seed` (the same items every run).
    Python code shipped in a model folder runs only with `trust_remote_code`. Write the record with
    `hywia.io.checks.strict_json`: a NaN perplexity (a live model with non-finite weights) becomes null there.
    """
    texts, task_names = parse_texts(ppl_texts), parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise InvalidRequestError(f"--limit must be a positive number of items, got {limit}")
    check_window_sizes(seq_len, ppl_tokens=ppl_tokens if texts else None)
    for text in texts:  # a bad file fails here, before the model loads, not after
        check_text_source(text)
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise InvalidRequestError("a live model needs its tokenizer")
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    else:
        name = describe(model)
        model, tokenizer = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    check_seq_len_fits(model.config, seq_len)
    started, cpu_started = time.perf_counter(), time.process_time()
    result = {
        "model": name,
        "params": count_params(model),
        "machine": machine(),
        "perplexity": perplexities(model, tokenizer, texts, seq_len, ppl_tokens),
        "zero_shot": None,
    }
    if task_names:
        from .zeroshot import zero_shot

        task_started = time.perf_counter()
        result["zero_shot"] = zero_shot(model, tokenizer, task_names, limit=limit, seed=seed, batch_size=batch_size)
        result["zero_shot"]["seconds"] = round(time.perf_counter() - task_started, 2)
    result["seconds"] = round(time.perf_counter() - started, 2)
    # CPU time: at one thread, close to what a quiet machine's wall clock would show.
    result["cpu_seconds"] = round(time.process_time() - cpu_started, 2)
    return result


def format_table(result: dict) -> str:
    """A plain-text table of an `evaluate` record, for the terminal."""
    rows = [("model", result["model"], ""), ("parameters", f"{result['params']:,}", "")]
    for text, row in result["perplexity"].items():
        rows.append((f"perplexity {text}", f"{row['ppl']:.2f}",
                     f"{row['tokens']} tokens, {row['seq_len']}-token windows: {row['description']}"))
    zero = result["zero_shot"]
    if zero:
        for task, row in zero["tasks"].items():
            norm = "" if row["acc_norm"] is None else f"  acc_norm {row['acc_norm']:.4f}"
            rows.append((task, f"acc {row['acc']:.4f}{norm}", f"n={row['n']} {row['split']} v{row['version']}"))
            if "perplexity" in row:
                rows.append((f"{task} perplexity", f"{row['perplexity']:.2f}", "of the last word"))
        for name, average in zero.get("averages", {}).items():
            rows.append((f"average {name}", f"acc {average['acc']:.4f}  acc_norm {average['acc_norm']:.4f}",
                         ",".join(average["tasks"])))
        rows.append(("average", f"acc {zero['average_acc']:.4f}  acc_norm {zero['average_acc_norm']:.4f}",
                     f"lm-eval {zero['lm_eval_version']}, subset seed {zero['seed']}"))
    rows.append(("seconds", f"{result['seconds']:.1f}", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows)
