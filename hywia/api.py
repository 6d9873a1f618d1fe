"""`hywia.prune`: the pipeline as one call — load, calibrate, score, plan, cut, measure, save."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .data.text import calibration_passages, calibration_windows, read_text_file
from .errors import InvalidRequestError
from .eval.perplexity import heldout_windows, perplexity
from .importance import ScoringContext, collect_statistics, get_criterion
from .io import check_output, describe, load_model, save_model
from .models import adapter_for
from .pruning import PruningPlan, allocate_uniform, apply_plan, parse_layers, select


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
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    device: str | None = None,
    dtype: str = "float32",
    ppl_text: str | None = "lambada",
    ppl_tokens: int = 16384,
    progress: bool = True,
) -> PruneResult:
    """Prune `ratio` of the decoder-layer parameters of `model` (a name, a folder, or a live model + tokenizer).

    `ratio` counts over all decoder layers, including those outside `layers`. With `out`, the pruned model,
    tokenizer, plan.json and report.json are written there atomically.
    """
    started = time.perf_counter()
    if not 0.0 < ratio < 1.0:
        raise InvalidRequestError(f"--ratio must lie strictly between 0 and 1, got {ratio}")
    if out is not None:
        check_output(Path(out), force)
    scorer = get_criterion(criterion)
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise InvalidRequestError("a live model needs its tokenizer")
        model_name = getattr(model.config, "_name_or_path", type(model).__name__) or type(model).__name__
    else:
        model_name = describe(model)
        model, tokenizer = load_model(model, device=device, dtype=dtype)
    adapter = adapter_for(model, attention)
    layer_indices = parse_layers(layers, len(adapter.layers()))
    keep = allocate_uniform(adapter, layer_indices, ratio)

    passages = read_text_file(Path(calib)) if calib else calibration_passages()
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
        )
    specs = {i: adapter.group_specs(adapter.layers()[i]) for i in layer_indices}
    ctx = ScoringContext(model, adapter, layer_indices, specs, batches, keep, seed, stats, progress)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        scores = scorer.score(ctx)
    del stats, ctx
    plan = select(adapter, scores, keep)
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
        "layers": [adapter.widths(layer) for layer in adapter.layers()],
        "calibration": {
            "text": str(calib) if calib else "LAMBADA-openai test passages (fiction), calibration part",
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
