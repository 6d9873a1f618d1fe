"""`hywia.prune` and `hywia.apply`: load, run the pipeline's stages, measure, save the model with its recipe."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import STORES
from .data.text import check_text_request, is_builtin_calibration
from .errors import InvalidRequestError
from .eval.perplexity import heldout_windows, perplexity
from .importance.collect import PATHS
from .io import check_output, describe, load_model, local_path, save_model, tempfiles
from .measure import StageLog, count_params, peak_rss_mb
from .offload import check_placement, place
from .pipeline import Pipeline, check_method
from .pruning import PruningPlan
from .pruning.methods import parse_compensation
from .settings import Recipe

__all__ = ["PruneResult", "apply", "load_recipe", "prune"]


@dataclass
class PruneResult:
    model: nn.Module
    tokenizer: object
    plan: PruningPlan
    report: dict


def prune(
    model: str | nn.Module | None = None,
    *,
    tokenizer=None,
    recipe: Recipe | str | Path | None = None,
    out: str | Path | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    **settings: Any,
) -> PruneResult:
    """Prune `ratio` of the decoder-layer parameters of `model` (a name, a folder, or a live model + tokenizer).

    `settings` are the fields of hywia.settings' configs by name, e.g. `ratio=0.2, criterion="hywia:steps=48",
    allocation="global:floor=0.1", compensate="lstsq:ridge=0.001", seed=1, ppl_text=None` (see `hywia prune
    --help`); they override `recipe` (a `Recipe`, or a recipe.json / report.json of an earlier prune), whose model
    is used when `model` is None. With `out`, the pruned model, tokenizer, plan.json, recipe.json (every setting
    resolved) and report.json (each stage's seconds and peak memory) are written there atomically;
    `out` may not be, hold or lie inside any input. Python code shipped in a model folder runs only with
    `trust_remote_code`, which no recipe can switch on. Disk-offloaded weights without an `offload_folder` go to a
    temporary folder, removed when the interpreter exits (the returned model reads from it).
    """
    recipe = load_recipe(recipe).replace(**settings)
    if model is None:
        model = recipe.model
    elif not isinstance(model, nn.Module):
        recipe = recipe.replace(model=str(model))
    _check(recipe, out, force)
    peak_before, log = peak_rss_mb(), StageLog()  # the stages reset the process's peak mark
    with log.stage("load"):
        model, tokenizer, model_name, folder = _load(model, tokenizer, recipe, trust_remote_code)
    config = recipe.prune
    pipeline = Pipeline(model, tokenizer, attention=config.attention, layers=config.layers,
                        calibration=recipe.calibration, runtime=recipe.runtime, progress=progress, log=log)
    prepared = pipeline.prepare(config)
    params_before, decoder_before = count_params(model), pipeline.adapter.num_decoder_params()
    with log.stage("perplexity_before"):
        ppl = _Perplexity(model, tokenizer, recipe)
    pipeline.calibrate([prepared])
    pruned = pipeline.run(prepared, in_place=True)
    resolved = dataclasses.replace(recipe, prune=prepared.resolved())
    with log.stage("report"):
        report = {"model": model_name, **pipeline.summary(pruned, decoder_before, params_before),
                  "placement": _placement(recipe, folder), **ppl.after(pruned.model)}
    report.update(stages=log.to_dict(), seconds=log.seconds(), peak_rss_mb=max(peak_before, log.peak_rss_mb()),
                  recipe=resolved.to_dict())
    if out is not None:
        save_model(pruned.model, tokenizer, Path(out), force=force, extra_json={
            "plan.json": pruned.plan.to_dict(), "recipe.json": resolved.to_dict(), "report.json": report})
    return PruneResult(pruned.model, tokenizer, pruned.plan, report)


def apply(
    plan: PruningPlan | str | Path,
    model: str | nn.Module | None = None,
    *,
    tokenizer=None,
    recipe: Recipe | str | Path | None = None,
    out: str | Path | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    **settings: Any,
) -> PruneResult:
    """Cut a dense model to a saved plan, without scoring: compensation as the recipe records it (default: the
    recipe.json beside a plan file), its calibration windows rebuilt from the recorded calibration settings, so the
    weights equal the original prune's. `settings` override the recipe as in `prune` (e.g. `compensate="none"`).
    """
    plan_path = None if isinstance(plan, PruningPlan) else Path(plan)
    if recipe is None and plan_path is not None and (plan_path.parent / "recipe.json").is_file():
        recipe = plan_path.parent / "recipe.json"
    if recipe is None and "compensate" not in settings:
        raise InvalidRequestError("no recipe.json beside the plan: give --recipe, or --compensate none|bias|lstsq")
    recipe = load_recipe(recipe).replace(**settings)
    plan = PruningPlan.load(plan_path) if plan_path is not None else plan
    parse_compensation(recipe.prune.compensate)
    if out is not None:
        check_output(Path(out), force, inputs={**prune_inputs(recipe), "--plan": plan_path})
    log = StageLog()
    with log.stage("load"):
        model, tokenizer, model_name, _ = _load(model if model is not None else recipe.model, tokenizer, recipe,
                                                trust_remote_code)
    pipeline = Pipeline(model, tokenizer, attention=plan.attention, layers=recipe.prune.layers,
                        calibration=recipe.calibration, runtime=recipe.runtime, progress=progress, log=log)
    pipeline.apply(plan, recipe.prune.compensate)
    report = {"model": model_name, "plan": str(plan_path) if plan_path else None,
              "compensate": recipe.prune.compensate, "params_after": count_params(model),
              "stages": log.to_dict(), "peak_rss_mb": log.peak_rss_mb(), "recipe": recipe.to_dict()}
    if out is not None:
        save_model(model, tokenizer, Path(out), force=force, extra_json={
            "plan.json": plan.to_dict(), "recipe.json": recipe.to_dict(), "report.json": report})
    return PruneResult(model, tokenizer, plan, report)


def load_recipe(recipe: Recipe | str | Path | None) -> Recipe:
    """A `Recipe` as given, read from a recipe.json or report.json, or the defaults."""
    if recipe is None:
        return Recipe()
    return recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)


def prune_inputs(recipe: Recipe) -> dict[str, Path | None]:
    """The paths a prune reads, which its output must leave alone."""
    calib, offload_folder = recipe.calibration.calib, recipe.runtime.offload_folder
    return {"--model": local_path(recipe.model),
            "--calib": Path(calib) if calib and not is_builtin_calibration(calib) else None,
            "--offload-folder": Path(offload_folder) if offload_folder else None,
            "--ppl-text": local_path(recipe.eval.ppl_text)}


def _check(recipe: Recipe, out: str | Path | None, force: bool) -> None:
    """Every check that needs no model, before anything is loaded: each failure is one line saying what to fix."""
    check_method(recipe.prune)
    if out is not None:
        check_output(Path(out), force, inputs=prune_inputs(recipe))
    check_text_request(recipe.calibration.calib, recipe.calibration.calib_samples, recipe.calibration.seq_len,
                       recipe.eval.ppl_text, recipe.eval.ppl_tokens)
    runtime = recipe.runtime
    if runtime.importance_path not in PATHS:
        raise InvalidRequestError(f"--importance-path must be one of {', '.join(PATHS)}, "
                                  f"got {runtime.importance_path!r}")
    if runtime.activation_store not in STORES:
        raise InvalidRequestError(f"--activation-store must be one of {', '.join(STORES)}, "
                                  f"got {runtime.activation_store!r}")
    check_placement(runtime.offload, runtime.device_map)


def _load(model: str | nn.Module | None, tokenizer, recipe: Recipe,
          trust_remote_code: bool) -> tuple[nn.Module, object, str, str | None]:
    """The model (loaded, or a live one placed as the runtime settings say), its tokenizer, its name and the offload
    folder.

    With offloading or a device map and no offload folder, weights go to a new temporary folder (hywia.io.tempfiles:
    removed when the CLI command ends or the interpreter exits, since the returned model reads from it).
    """
    runtime = recipe.runtime
    placed = runtime.offload is not None or runtime.device_map is not None
    folder = (runtime.offload_folder or tempfiles.temp_dir("offload")) if placed else None
    if not isinstance(model, nn.Module):
        loaded, tokenizer = load_model(model, device=runtime.device, dtype=runtime.dtype, offload=runtime.offload,
                                       device_map=runtime.device_map, offload_folder=folder,
                                       trust_remote_code=trust_remote_code)
        return loaded, tokenizer, describe(model), folder
    if tokenizer is None:
        raise InvalidRequestError("a live model needs its tokenizer")
    name = getattr(model.config, "_name_or_path", type(model).__name__) or type(model).__name__
    if placed:
        model = place(model, offload=runtime.offload, device_map=runtime.device_map, folder=folder,
                      device=runtime.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model, tokenizer, name, folder


def _placement(recipe: Recipe, folder: str | None) -> dict:
    return {"offload": recipe.runtime.offload, "device_map": recipe.runtime.device_map,
            "offload_folder": str(folder) if folder else None}


class _Perplexity:
    """Perplexity on the recipe's held-out text, before (at construction) and after pruning, on the same windows."""

    def __init__(self, model: nn.Module, tokenizer, recipe: Recipe) -> None:
        self.text = recipe.eval.ppl_text
        self.windows, self.info, self.before = None, None, None
        if self.text:
            name, self.windows = heldout_windows(tokenizer, self.text, recipe.calibration.seq_len,
                                                 recipe.eval.ppl_tokens)
            self.info = {"text": name, "tokens": int(self.windows.numel()), "seq_len": recipe.calibration.seq_len}
            self.before = perplexity(model, self.windows)

    def after(self, model: nn.Module) -> dict:
        return {"ppl_text": self.info, "ppl_before": self.before,
                "ppl_after": perplexity(model, self.windows) if self.text else None}
