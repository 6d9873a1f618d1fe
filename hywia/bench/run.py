"""`hywia bench`: every (criterion, ratio) pruned from the same dense model with the same calibration windows, then
measured the same way (perplexity on each text, zero-shot accuracy on fixed seeded task subsets).

The dense model is loaded once and never modified: each run prunes a deep copy, so no run sees another's surgery and
no time goes to reloading. Runs are written to `bench.json` as they finish, so an interrupted bench keeps its numbers.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..api import prune
from ..data.text import calibration_source, calibration_windows
from ..errors import InvalidRequestError
from ..eval.api import evaluate, machine, parse_list, parse_tasks, parse_texts
from ..importance import ScoringContext, collect_statistics, get_criterion
from ..importance.fusion import spearman
from ..importance.taylor import taylor_scores
from ..models import adapter_for
from ..pruning import parse_layers
from .plots import plot_agreement, plot_alpha, plot_widths
from .report import render_markdown, write_markdown

# hywia's defaults; the single granularities and a fixed blend through the same pipeline (the fusion's ablation);
# then each peer at its own published recipe: LLM-Pruner's three criteria (uniform, no compensation), FLAP (its
# fluctuation metric, adaptive structure, bias compensation), Wanda-sp; and the data-free floors.
DEFAULT_CRITERIA = (
    "hywia", "taylor-element1", "taylor-vector", "fixed:0.5",
    "taylor-element1@allocation=uniform@compensate=none", "taylor-element2@allocation=uniform@compensate=none",
    "taylor-vector@allocation=uniform@compensate=none", "flap@compensate=bias",
    "wanda-sp@allocation=uniform@compensate=none", "magnitude", "random",
)
DEFAULT_LIMIT = 100

# `prune` arguments the bench sets itself: one model, one calibration set and one evaluation for every run.
_RESERVED = {"model", "tokenizer", "ratio", "criterion", "calib", "calib_samples", "seq_len", "seed", "out", "force",
             "device", "dtype", "ppl_text", "ppl_tokens", "progress"}


@dataclass(frozen=True)
class Variant:
    """One pruning configuration: a criterion plus extra `prune` keyword arguments, labelled as it was written."""

    label: str
    criterion: str
    options: dict = field(default_factory=dict)


def parse_value(text: str):
    """An option value as JSON when it parses (numbers, true/false, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_option(pair: str) -> tuple[str, object]:
    key, sep, value = pair.partition("=")
    if not sep or not key.strip():
        raise InvalidRequestError(f"a prune option must look like KEY=VALUE, got {pair!r}")
    return key.strip(), parse_value(value.strip())


def parse_variant(spec: str) -> Variant:
    """`criterion[@key=value]...`, e.g. `hywia@allocation=global@compensate=true`."""
    criterion, *pairs = spec.strip().split("@")
    if not criterion:
        raise InvalidRequestError(f"a criteria entry needs a criterion name, got {spec!r}")
    return Variant(spec.strip(), criterion, dict(parse_option(pair) for pair in pairs))


def check_options(options: dict) -> None:
    """Fail before an hour of work if an option is not a `prune` argument the bench leaves open."""
    allowed = set(inspect.signature(prune).parameters) - _RESERVED
    for key in options:
        if key not in allowed:
            reason = "is set by the bench for every run" if key in _RESERVED else "is not an argument of hywia.prune"
            raise InvalidRequestError(f"prune option {key!r} {reason}; options allowed: {', '.join(sorted(allowed))}")


@contextmanager
def peak_memory() -> Iterator[dict]:
    """Peak resident memory (MB) of this process inside the block.

    On Linux the high-water mark is reset on entry (/proc/self/clear_refs), so the peak is this block's own;
    elsewhere it is the process peak so far, and `scope` says so.
    """
    record: dict = {}
    try:
        Path("/proc/self/clear_refs").write_text("5")
        scope = "run"
    except OSError:
        scope = "process"
    record["rss_before_mb"] = _status_mb("VmRSS")
    try:
        yield record
    finally:
        peak = _status_mb("VmHWM") if scope == "run" else None
        record["peak_rss_mb"] = peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record["scope"] = scope if peak is not None else "process"


def _status_mb(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def granularity_agreement(
    model: nn.Module, batches: torch.Tensor, *, layers: str | None, attention: str, progress: bool
) -> list[dict]:
    """Per pruned layer and kind, Spearman correlation of the fine-grained (taylor-element1/2) with the
    coarse-grained (taylor-vector) scores on the dense model: low values mean the granularities would keep
    different structures, which is what HyWIA's fusion exploits."""
    adapter = adapter_for(model, attention)
    layer_indices = parse_layers(layers, len(adapter.layers()))
    stats = collect_statistics(model, adapter, layer_indices, batches, gradients=True, activations=False,
                               progress=progress)
    specs = {i: adapter.group_specs(adapter.layers()[i]) for i in layer_indices}
    ctx = ScoringContext(model, adapter, layer_indices, specs, batches, {}, stats=stats, progress=progress)
    coarse = taylor_scores(ctx, "coarse", 1)
    fine1, fine2 = taylor_scores(ctx, "fine", 1), taylor_scores(ctx, "fine", 2)
    return [
        {"layer": key[0], "kind": key[1], "element1_vs_vector": spearman(fine1[key], coarse[key]),
         "element2_vs_vector": spearman(fine2[key], coarse[key])}
        for key in coarse
    ]


def run(
    model: nn.Module,
    tokenizer,
    *,
    ratios: Sequence[float],
    criteria: str | Sequence[str] = DEFAULT_CRITERIA,
    tasks: str | Sequence[str] = "all",
    limit: int | None = DEFAULT_LIMIT,
    seed: int = 0,
    ppl_texts: str | Sequence[str] = ("lambada", "coqa"),
    ppl_tokens: int = 16384,
    seq_len: int = 128,
    calib: str | Path | None = None,
    calib_samples: int = 64,
    prune_kwargs: dict | None = None,
    out_dir: str | Path = "bench",
    markdown: str | Path | None = None,
    model_description: str | None = None,
    command: str | None = None,
    progress: bool = True,
) -> dict:
    """Prune `model` (never modified) once per (criterion entry, ratio), evaluate each result and the dense model,
    and write `bench.json`, `bench.md` and the plots into `out_dir` (plus the table section of `markdown`).

    `criteria` entries may carry extra `prune` arguments (`hywia@allocation=global`); `prune_kwargs` apply to every
    run, an entry's own options override them. Returns the JSON record.
    """
    started = time.perf_counter()
    variants = [parse_variant(spec) for spec in parse_list(criteria)]
    if not variants:
        raise InvalidRequestError("--criteria names no criterion")
    ratios = [float(r) for r in ratios]
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise InvalidRequestError(f"--ratios must be values strictly between 0 and 1, got {ratios}")
    common = dict(prune_kwargs or {})
    for options in [common] + [v.options for v in variants]:
        check_options(options)
    for variant in variants:
        get_criterion(variant.criterion)  # a misspelt name fails now, not after an hour of other runs
    texts, task_names = parse_texts(ppl_texts), parse_tasks(tasks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = _printer(progress)

    calib_text, passages = calibration_source(calib)
    batches = calibration_windows(tokenizer, passages, calib_samples, seq_len, seed)
    measure = dict(ppl_texts=texts, tasks=task_names, limit=limit, seed=seed, seq_len=seq_len, ppl_tokens=ppl_tokens)
    record: dict = {
        "model": model_description or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "machine": machine(),
        "load_average_start": list(os.getloadavg()),
        "command": command,
        "settings": {
            "ratios": ratios, "criteria": [v.label for v in variants], "tasks": task_names, "limit": limit,
            "seed": seed, "ppl_texts": texts, "ppl_tokens": ppl_tokens, "seq_len": seq_len,
            "calibration": {"text": calib_text,
                            "samples": calib_samples, "seq_len": seq_len, "seed": seed},
            "prune_kwargs": common,
        },
        "runs": [],
    }
    adapter = adapter_for(model, common.get("attention", "heads"))
    record["dense_widths"] = [adapter.widths(layer) for layer in adapter.layers()]
    json_path = out_dir / "bench.json"

    say("dense model: evaluating")
    record["dense"] = evaluate(model, tokenizer, **measure)
    _dump(json_path, record)

    say("dense model: fine- vs coarse-grained rank agreement")
    agreement_started = time.perf_counter()
    record["granularity_agreement"] = {
        "per_layer": granularity_agreement(model, batches, layers=common.get("layers"),
                                           attention=common.get("attention", "heads"), progress=progress),
    }
    record["granularity_agreement"]["seconds"] = round(time.perf_counter() - agreement_started, 2)
    _dump(json_path, record)

    total = len(ratios) * len(variants)
    for ratio in ratios:
        for variant in variants:
            say(f"[{len(record['runs']) + 1}/{total}] {variant.label} at ratio {ratio}: pruning")
            working = copy.deepcopy(model)
            cpu_started = time.process_time()
            with peak_memory() as memory:
                result = prune(
                    working, tokenizer=tokenizer, ratio=ratio, criterion=variant.criterion, calib=calib,
                    calib_samples=calib_samples, seq_len=seq_len, seed=seed, ppl_text=None, progress=progress,
                    **{**common, **variant.options},
                )
            say(f"[{len(record['runs']) + 1}/{total}] {variant.label} at ratio {ratio}: "
                f"pruned in {result.report['seconds']:.0f} s, evaluating")
            record["runs"].append({
                "label": variant.label,
                "criterion": variant.criterion,
                "options": {**common, **variant.options},
                "ratio": ratio,
                "prune_seconds": result.report["seconds"],
                "prune_cpu_seconds": round(time.process_time() - cpu_started, 2),
                "memory": memory,
                "report": result.report,
                "eval": evaluate(result.model, tokenizer, **measure),
            })
            _dump(json_path, record)
            del working, result

    record["load_average_end"] = list(os.getloadavg())
    record["seconds"] = round(time.perf_counter() - started, 2)
    plots = {
        "widths": plot_widths(record, out_dir / "widths.png"),
        "agreement": plot_agreement(record, out_dir / "agreement.png"),
        "alpha": plot_alpha(record, out_dir / "alpha.png"),
    }
    record["plots"] = {name: str(path) for name, path in plots.items() if path is not None}
    _dump(json_path, record)
    write_markdown(out_dir / "bench.md", render_markdown(record, out_dir))
    if markdown is not None:
        write_markdown(Path(markdown), render_markdown(record, Path(markdown).parent))
    say(f"done in {record['seconds'] / 60:.1f} min: {json_path}")
    return record


def _printer(enabled: bool):
    def say(message: str) -> None:
        if enabled:
            print(f"hywia bench: {message}", file=sys.stderr, flush=True)

    return say


def _dump(path: Path, record: dict) -> None:
    """Write the JSON through a temporary sibling so a reader never sees half a file. A diverged run's NaN or
    infinite perplexity is written as null: standard JSON has no such numbers."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_finite(record), indent=1, allow_nan=False))
    os.replace(tmp, path)


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
