"""`hywia bench`: every (criterion, ratio) pruned from the same dense model with the same calibration windows, then
measured the same way (perplexity on each text, zero-shot accuracy on fixed seeded task subsets).

The dense model is loaded once and never modified: each run prunes a deep copy, so no run sees another's surgery and
no time goes to reloading. Runs are written to `bench.json` as they finish, so an interrupted bench keeps its numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..errors import InvalidRequestError
from ..eval.api import evaluate, machine, parse_list, parse_tasks, parse_texts
from ..importance import ScoringContext
from ..io import write_text_atomic
from ..io.checks import strict_json
from ..importance.fusion import spearman
from ..importance.taylor import taylor_scores
from ..measure import StageLog, count_params, peak_rss_mb, reset_peak_rss, status_mb
from ..models import adapter_for
from ..data.text import BUILTIN_TEXTS, DEFAULT_CALIBRATION, LEGACY_CALIBRATION, calibration_description
from ..pipeline import Pipeline, PreparedRun
from ..settings import CalibrationConfig, PruneConfig, RuntimeConfig
from .plots import plot_agreement, plot_alpha, plot_widths
from .report import render_markdown, write_markdown

# hywia's defaults; the single granularities and a fixed blend through the same pipeline (the fusion's ablation);
# then each peer at its own published recipe: LLM-Pruner's three criteria (uniform, no compensation), FLAP (its
# fluctuation metric, adaptive structure with heads and channels ranked alike, bias compensation), Wanda-sp; and the
# data-free floors.
DEFAULT_CRITERIA = (
    "hywia", "taylor-element1", "taylor-vector", "fixed:0.5",
    "taylor-element1@allocation=uniform@compensate=none", "taylor-element2@allocation=uniform@compensate=none",
    "taylor-vector@allocation=uniform@compensate=none", "flap@allocation=global:attention_weight=1@compensate=bias",
    "wanda-sp@allocation=uniform@compensate=none", "magnitude", "random",
)
DEFAULT_LIMIT = 100
# every built-in text: the calibration source's own held-out part is shown as in-domain, the others are judged
CROSS_DOMAIN_TEXTS = ",".join(BUILTIN_TEXTS)

# Prune settings an entry may carry: the method's, and how its statistics are taken (entries that differ in the
# latter four get their own calibration pass). The bench sets the rest itself: one model, one calibration set and
# one evaluation for every run.
_OPTIONS = {"allocation", "compensate", "round_to", "attention", "layers", "importance_path", "activation_store"}
_RESERVED = {"model", "tokenizer", "ratio", "criterion", "calib", "calib_samples", "seq_len", "seed", "out", "force",
             "device", "dtype", "ppl_text", "ppl_tokens", "progress", "offload", "device_map", "offload_folder"}


@dataclass(frozen=True)
class Variant:
    """One pruning configuration: a criterion plus prune settings, labelled as it was written."""

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
    """Fail before an hour of work if an option is not a prune setting the bench leaves open."""
    for key in options:
        if key not in _OPTIONS:
            reason = "is set by the bench for every run" if key in _RESERVED else "is not an argument of hywia.prune"
            raise InvalidRequestError(f"prune option {key!r} {reason}; options allowed: {', '.join(sorted(_OPTIONS))}")


@contextmanager
def peak_memory() -> Iterator[dict]:
    """Peak resident memory (MB) of this process inside the block.

    On Linux the high-water mark is reset on entry (/proc/self/clear_refs), so the peak is this block's own;
    elsewhere it is the process peak so far, and `scope` says so.
    """
    scope = "run" if reset_peak_rss() else "process"
    record: dict = {"rss_before_mb": status_mb("VmRSS")}
    try:
        yield record
    finally:
        peak = status_mb("VmHWM") if scope == "run" else None
        record["peak_rss_mb"] = peak if peak is not None else peak_rss_mb()
        record["scope"] = scope if peak is not None else "process"


NO_AGREEMENT = "no run with the common settings reads gradients, so their calibration pass took none"


def granularity_agreement(pipeline: Pipeline) -> list[dict]:
    """Per pruned layer and kind, Spearman correlation of the fine-grained (taylor-element1/2) with the
    coarse-grained (taylor-vector) scores on the dense model, from the pipeline's calibration pass: low values mean
    the granularities would keep different structures, which is what HyWIA's fusion exploits."""
    specs = {i: pipeline.adapter.group_specs(pipeline.adapter.layers()[i]) for i in pipeline.layer_indices}
    ctx = ScoringContext(pipeline.model, pipeline.adapter, pipeline.layer_indices, specs, pipeline.windows(), {},
                         stats=pipeline.stats, progress=pipeline.progress)
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
    calib: str | Path | None = DEFAULT_CALIBRATION,
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

    `criteria` entries may carry prune settings (`hywia@allocation=global`); `prune_kwargs` apply to every run, an
    entry's own options override them. Runs that share their layers, attention and statistics path share one
    calibration pass (hywia.pipeline); each run compensates and cuts its own copy. Returns the JSON record.
    """
    started = time.perf_counter()
    variants = [parse_variant(spec) for spec in parse_list(criteria)]
    ratios, common = [float(r) for r in ratios], dict(prune_kwargs or {})
    calibration = CalibrationConfig(calib=str(calib) if calib else None, calib_samples=calib_samples,
                                    seq_len=seq_len)
    pipelines: dict[tuple, Pipeline] = {}
    runs = _check_runs(pipelines, model, tokenizer, calibration, seed, progress, ratios, variants, common)
    texts, task_names = parse_texts(ppl_texts), parse_tasks(tasks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = _printer(progress)
    measure = dict(ppl_texts=texts, tasks=task_names, limit=limit, seed=seed, seq_len=seq_len, ppl_tokens=ppl_tokens)
    record: dict = {
        "model": model_description or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "machine": machine(),
        "load_average_start": list(os.getloadavg()),
        "command": command,
        "settings": {**measure, "ratios": ratios, "criteria": [v.label for v in variants],
                     "calibration": {"text": calibration_description(calibration.calib),
                                     "source": calibration.calib or LEGACY_CALIBRATION, "samples": calib_samples, "seq_len": seq_len, "seed": seed},
                     "prune_kwargs": common},
        "runs": [],
    }
    adapter = adapter_for(model, common.get("attention", "heads"))
    record["dense_widths"] = [adapter.widths(layer) for layer in adapter.layers()]
    json_path = out_dir / "bench.json"

    say("dense model: evaluating")
    record["dense"] = evaluate(model, tokenizer, **measure)
    _dump(json_path, record)

    say("dense model: calibration, and fine- vs coarse-grained rank agreement where a run reads gradients")
    reference = _prepare(pipelines, model, tokenizer, calibration, seed, progress, ratios[0], common, "taylor-vector")
    first = next(iter(pipelines.values()))
    record["calibration_passes"] = []
    for key, pipeline in pipelines.items():
        if pipeline is not first:  # the windows are built once, in the first pass (`--calib self` samples them)
            pipeline.share_windows(first)
        record["calibration_passes"].append(_calibrate(pipeline, [r for _, _, r in runs], key))
    agreement_from = pipelines[_key(reference.config)]
    record["granularity_agreement"] = (
        {"per_layer": granularity_agreement(agreement_from)} if agreement_from.stats and agreement_from.stats.taylor
        else {"per_layer": [], "skipped": NO_AGREEMENT})
    _dump(json_path, record)

    for ratio, variant, prepared in runs:
        step = f"[{len(record['runs']) + 1}/{len(runs)}] {variant.label} at ratio {ratio}"
        say(f"{step}: pruning")
        entry = _prune_copy(pipelines[_key(prepared.config)], prepared)
        say(f"{step}: pruned in {entry['prune_seconds']:.0f} s, evaluating")
        entry.update(label=variant.label, criterion=variant.criterion, options={**common, **variant.options},
                     ratio=ratio, eval=evaluate(entry.pop("model"), tokenizer, **measure))
        record["runs"].append(entry)
        _dump(json_path, record)

    record["load_average_end"] = list(os.getloadavg())
    record["seconds"] = round(time.perf_counter() - started, 2)
    _write_outputs(record, out_dir, markdown)
    say(f"done in {record['seconds'] / 60:.1f} min: {json_path}")
    return record


def _check_runs(pipelines: dict, model: nn.Module, tokenizer, calibration: CalibrationConfig, seed: int,
                progress: bool, ratios: list[float], variants: list[Variant], common: dict) -> list[tuple]:
    """(ratio, entry, prepared run) for every run, each setting checked before any work."""
    if not variants:
        raise InvalidRequestError("--criteria names no criterion")
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise InvalidRequestError(f"--ratios must be values strictly between 0 and 1, got {ratios}")
    for options in [common] + [v.options for v in variants]:
        check_options(options)
    return [(ratio, variant, _prepare(pipelines, model, tokenizer, calibration, seed, progress, ratio,
                                      {**common, **variant.options}, variant.criterion))
            for ratio in ratios for variant in variants]


def _key(config: PruneConfig) -> tuple:
    """What a calibration pass depends on beyond the shared windows (the statistics path aside: one per key)."""
    return config.attention, config.layers


def _prepare(pipelines: dict, model: nn.Module, tokenizer, calibration: CalibrationConfig, seed: int,
             progress: bool, ratio: float, options: dict, criterion: str) -> PreparedRun:
    """The run's settings checked against the model, and the pipeline (one per layer range and statistics path)
    that will prune it."""
    prune_fields = {f.name for f in dataclasses.fields(PruneConfig)}
    config = PruneConfig(ratio=ratio, criterion=criterion, **{k: v for k, v in options.items() if k in prune_fields})
    runtime = RuntimeConfig(seed=seed, **{k: v for k, v in options.items() if k not in prune_fields})
    key = _key(config)
    if key not in pipelines:
        pipelines[key] = Pipeline(model, tokenizer, attention=config.attention, layers=config.layers,
                                  calibration=calibration, runtime=runtime, progress=progress)
    elif pipelines[key].runtime != runtime:
        raise InvalidRequestError("entries with the same --layers and attention must share importance_path and "
                                  "activation_store (one calibration pass)")
    return pipelines[key].prepare(config)


def _calibrate(pipeline: Pipeline, runs: list[PreparedRun], key: tuple) -> dict:
    """One calibration pass for every run of this pipeline, with gradients only where a run reads them: for
    forward-only criteria (FLAP, Wanda-sp) the backward pass would cost several times their whole prune, and the
    rank agreement it would feed is not theirs."""
    pipeline.log = StageLog()
    pipeline.calibrate([r for r in runs if _key(r.config) == key])
    return {"attention": key[0], "layers": key[1], "samples": len(pipeline.windows()),
            **pipeline.log.to_dict()["calibrate"]}


def _prune_copy(pipeline: Pipeline, prepared: PreparedRun) -> dict:
    """score -> plan -> compensate -> cut on a copy of the dense model; its report, seconds and memory."""
    pipeline.log = StageLog()
    cpu_started = time.process_time()
    with peak_memory() as memory:
        pruned = pipeline.run(prepared, in_place=False)
    decoder_before = pipeline.adapter.num_decoder_params()
    report = {**pipeline.summary(pruned, decoder_before, count_params(pipeline.model)),
              "stages": pipeline.log.to_dict()}
    memory["peak_rss_mb"] = max(memory["peak_rss_mb"], pipeline.log.peak_rss_mb())
    return {"model": pruned.model, "prune_seconds": pipeline.log.seconds(),
            "prune_cpu_seconds": round(time.process_time() - cpu_started, 2), "memory": memory, "report": report}


def _write_outputs(record: dict, out_dir: Path, markdown: str | Path | None) -> None:
    plots = {
        "widths": plot_widths(record, out_dir / "widths.png"),
        "agreement": plot_agreement(record, out_dir / "agreement.png"),
        "alpha": plot_alpha(record, out_dir / "alpha.png"),
    }
    record["plots"] = {name: str(path) for name, path in plots.items() if path is not None}
    _dump(out_dir / "bench.json", record)
    write_markdown(out_dir / "bench.md", render_markdown(record, out_dir))
    if markdown is not None:
        write_markdown(Path(markdown), render_markdown(record, Path(markdown).parent))


def _printer(enabled: bool):
    def say(message: str) -> None:
        if enabled:
            print(f"hywia bench: {message}", file=sys.stderr, flush=True)

    return say


def _dump(path: Path, record: dict) -> None:
    """Write the JSON in one step, so a reader never sees half a file; a diverged run's NaN or infinite
    perplexity is written as null (standard JSON has no such numbers)."""
    write_text_atomic(path, strict_json(record, indent=1))
