"""`hywia.prune`: the pipeline as one call — load, calibrate, score, plan, cut, measure, save."""

from __future__ import annotations

import resource
import tempfile
import time
from functools import partial
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .data.text import calibration_source, calibration_windows
from .errors import InvalidRequestError
from .eval.perplexity import heldout_windows, perplexity
from .importance import ScoringContext, collect_statistics, get_criterion
from .importance.collect import PATHS
from .importance.layerwise import STORES
from .io import check_output, describe, load_model, save_model
from .models import adapter_for
from .offload import check_placement, place
from .pruning import PruningPlan, allocate_global, allocate_uniform, apply_plan, parse_layers, select
from .pruning.compensate import MODES, compensate as compensate_removed

ALLOCATIONS = ("uniform", "global")


@dataclass
class PruneResult:
    model: nn.Module
    tokenizer: object
    plan: PruningPlan
    report: dict


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prune(
    model: str | nn.Module | None = None,
    *,
    ratio: float,
    tokenizer=None,
    criterion: str = "hywia",
    calib: str | Path | None = None,
    calib_samples: int = 64,
    seq_len: int = 128,
    layers: str | None = None,
    attention: str = "heads",
    allocation: str = "global",
    compensate: str = "lstsq",
    round_to: int = 1,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    device: str | None = None,
    dtype: str = "float32",
    importance_path: str = "layerwise",
    activation_store: str = "auto",
    offload: str | None = None,
    device_map: str | dict | None = None,
    offload_folder: str | Path | None = None,
    ppl_text: str | None = "lambada",
    ppl_tokens: int = 16384,
    progress: bool = True,
) -> PruneResult:
    """Prune `ratio` of the decoder-layer parameters of `model` (a name, a folder, or a live model + tokenizer).

    `ratio` counts over all decoder layers, including those outside `layers`. `allocation` is `uniform` (every
    pruned layer loses the same share) or `global` (groups of all pruned layers ranked together); `compensate`
    is `none`, `bias` or `lstsq` (see hywia.pruning.compensate). With `out`, the pruned model, tokenizer,
    plan.json and report.json are written there atomically.

    `importance_path` is `layerwise` (one layer's gradient statistics in memory at a time; per-sample layer inputs
    wait in `activation_store`: `auto`, `memory` or `disk`) or `plain` (a full backward per sample: about twice
    the pruned layers' weights in extra memory); both give the same scores. `offload` ("cpu" or "disk") keeps the
    decoder layers there and streams them through `device` one at a time for calibration, scoring and surgery;
    `device_map` lets accelerate place the model instead ("auto": across the GPUs). Disk-offloaded weights go to
    `offload_folder` (default: a new temporary folder, kept because the returned model reads from it).
    """
    started = time.perf_counter()
    if not 0.0 < ratio < 1.0:
        raise InvalidRequestError(f"--ratio must lie strictly between 0 and 1, got {ratio}")
    if out is not None:
        check_output(Path(out), force)
    scorer = get_criterion(criterion)
    if allocation not in ALLOCATIONS:
        raise InvalidRequestError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    if compensate not in MODES:
        raise InvalidRequestError(f"--compensate must be one of {', '.join(MODES)}, got {compensate!r}")
    if round_to < 1:
        raise InvalidRequestError(f"--round-to must be >= 1, got {round_to}")
    if importance_path not in PATHS:
        raise InvalidRequestError(f"--importance-path must be one of {', '.join(PATHS)}, got {importance_path!r}")
    if activation_store not in STORES:
        raise InvalidRequestError(f"--activation-store must be one of {', '.join(STORES)}, got {activation_store!r}")
    check_placement(offload, device_map)
    placed = offload is not None or device_map is not None
    if placed:
        offload_folder = offload_folder or tempfile.mkdtemp(prefix="hywia-offload-")
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise InvalidRequestError("a live model needs its tokenizer")
        model_name = getattr(model.config, "_name_or_path", type(model).__name__) or type(model).__name__
        if placed:
            model = place(model, offload=offload, device_map=device_map, folder=offload_folder,
                          device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    else:
        model_name = describe(model)
        model, tokenizer = load_model(model, device=device, dtype=dtype, offload=offload, device_map=device_map,
                                      offload_folder=offload_folder)
    adapter = adapter_for(model, attention)
    layer_indices = parse_layers(layers, len(adapter.layers()))
    keep = allocate_uniform(adapter, layer_indices, ratio, round_to)
    allocate = None
    if allocation == "global":
        allocate = partial(allocate_global, adapter, layer_indices, ratio, round_to=round_to)

    calib_text, passages = calibration_source(calib)
    batches = calibration_windows(tokenizer, passages, calib_samples, seq_len, seed)
    params_before, decoder_before = count_params(model), adapter.num_decoder_params()
    ppl_before, ppl_info, eval_windows = None, None, None
    if ppl_text:
        text_name, eval_windows = heldout_windows(tokenizer, ppl_text, seq_len, ppl_tokens)
        ppl_info = {"text": text_name, "tokens": int(eval_windows.numel()), "seq_len": seq_len}
        ppl_before = perplexity(model, eval_windows)

    stats = None
    if scorer.needs_gradients or scorer.needs_activations:
        stats = collect_statistics(
            model, adapter, layer_indices, batches,
            gradients=scorer.needs_gradients, activations=scorer.needs_activations, progress=progress,
            path=importance_path, store=activation_store,
        )
    specs = {i: adapter.group_specs(adapter.layers()[i]) for i in layer_indices}
    ctx = ScoringContext(model, adapter, layer_indices, specs, batches, keep, seed, stats, progress, allocate,
                         compensate)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        scores = scorer.score(ctx)
    del stats, ctx
    plan = select(adapter, scores, allocate(scores) if allocate else keep)
    if compensate != "none":
        compensate_removed(model, adapter, plan, batches, compensate, progress=progress)
    apply_plan(model, plan)

    adapter = adapter_for(model, attention)
    decoder_after = adapter.num_decoder_params()
    report = {
        "model": model_name,
        "criterion": criterion,
        "ratio_requested": ratio,
        "ratio_achieved": 1 - decoder_after / decoder_before,
        "params_before": params_before,
        "params_after": count_params(model),
        "decoder_params_before": decoder_before,
        "decoder_params_after": decoder_after,
        "layers_pruned": [layer_indices[0], layer_indices[-1] + 1],
        "attention": attention,
        "allocation": allocation,
        "compensate": compensate,
        "round_to": round_to,
        "importance_path": importance_path,
        "placement": {"offload": offload, "device_map": device_map,
                      "offload_folder": str(offload_folder) if placed else None},
        "layers": [adapter.widths(layer) for layer in adapter.layers()],
        "calibration": {
            "text": calib_text,
            "samples": calib_samples,
            "seq_len": seq_len,
            "seed": seed,
        },
        "ppl_text": ppl_info,
        "ppl_before": ppl_before,
        "ppl_after": perplexity(model, eval_windows) if ppl_text else None,
        "fusion": scorer.summary(),
    }
    if abs(report["ratio_achieved"] - ratio) > 0.01:
        report["ratio_note"] = (
            "achieved share differs from the request by more than 1 point: head granularity and the "
            "--layers range allow no closer split"
        )
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if out is not None:
        save_model(model, tokenizer, Path(out), extra_json={"plan.json": plan.to_dict(), "report.json": report},
                   force=force)
    return PruneResult(model, tokenizer, plan, report)
