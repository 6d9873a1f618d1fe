"""The prune pipeline as stages: calibrate -> score -> plan -> compensate -> cut -> report.

One `Pipeline` holds a dense model, its calibration windows and (after `calibrate`) the statistics of one
calibration pass. Each `PruneConfig` run through it (`run`) scores on the dense model, plans, and then compensates
and cuts either the model itself (`hywia.prune`) or a copy (a variant study: many criteria, allocations,
compensations and ratios on one calibration pass, as `hywia bench` and benchmarks/ablation.py do). Every stage's
seconds and peak memory go to the pipeline's `StageLog`.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from .data.generated import generation_steps, self_calibration_windows
from .data.text import (GENERATED_CALIBRATION, calibration_description, calibration_source, calibration_windows,
                        check_seq_len_fits)
from .errors import InvalidRequestError
from .importance import Criterion, ScoringContext, Statistics, collect_statistics, get_criterion
from .importance.obs import projection_grams
from .measure import StageLog, count_params
from .offload import execution_device, is_offloaded
from .models import ATTENTION_MODES, Adapter, LayerKind, adapter_for
from .pruning import (PruningPlan, allocate_global, allocate_uniform, apply_plan, check_plan_request, parse_layers,
                      select)
from .pruning.compensate import compensate
from .pruning.plan import log_depth_weights, resolve_round_to
from .pruning.search import search_profile
from .pruning.methods import parse_allocation, parse_compensation
from .settings import CalibrationConfig, PruneConfig, RuntimeConfig, format_spec


@dataclass
class PreparedRun:
    """A `PruneConfig` resolved: the criterion object, the allocation and compensation with their settings, and the
    uniform allocation's counts (which also check that the ratio fits the pruned layers)."""

    config: PruneConfig
    criterion: Criterion
    allocation: tuple[str, object]
    compensation: tuple[str, object]
    keep: dict[LayerKind, int]
    search: dict = field(default_factory=dict)  # what `--allocation search` found (`pruning.search.search_profile`)

    def resolved(self) -> PruneConfig:
        """The config with every method setting written out (what a recipe stores)."""
        return dataclasses.replace(self.config, criterion=self.criterion.spec,
                                   allocation=format_spec(*self.allocation),
                                   compensate=format_spec(*self.compensation))


@dataclass
class Pruned:
    model: nn.Module
    plan: PruningPlan
    prepared: PreparedRun
    compensation: dict[str, int] = field(default_factory=dict)  # how often each fit was chosen (`compensate`)


def check_method(config: PruneConfig) -> tuple[Criterion, tuple, tuple]:
    """The config's method, validated without a model (one-line errors): criterion, allocation, compensation."""
    if config.ratio is None:
        raise InvalidRequestError("--ratio is required (or a --recipe that sets it)")
    if not 0.0 < config.ratio < 1.0:
        raise InvalidRequestError(f"--ratio must lie strictly between 0 and 1, got {config.ratio}")
    if config.round_to is not None and config.round_to < 1:
        raise InvalidRequestError(f"--round-to must be >= 1, got {config.round_to}")
    if config.attention not in ATTENTION_MODES:
        raise InvalidRequestError(f"--attention must be one of {', '.join(ATTENTION_MODES)}, got {config.attention!r}")
    return get_criterion(config.criterion), parse_allocation(config.allocation), parse_compensation(config.compensate)


class Pipeline:
    """Stages over one dense model (module docstring). `attention` and `layers` are fixed per pipeline: the
    statistics depend on them; everything else of a `PruneConfig` may differ between runs."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        attention: str = "heads",
        layers: str | None = None,
        calibration: CalibrationConfig = CalibrationConfig(),
        runtime: RuntimeConfig = RuntimeConfig(),
        progress: bool = True,
        log: StageLog | None = None,
        windows: torch.Tensor | None = None,
    ) -> None:
        """`windows` (token ids [samples, seq_len]) replace the ones `calibration` would build from text."""
        self.model, self.tokenizer = model, tokenizer
        self.attention, self.layers = attention, layers
        self.calibration, self.runtime, self.progress = calibration, runtime, progress
        self.log = log or StageLog()
        self.adapter: Adapter = adapter_for(model, attention)
        self.layer_indices = parse_layers(layers, len(self.adapter.layers()))
        check_seq_len_fits(model.config, calibration.seq_len)
        self.stats: Statistics | None = None
        self._windows = windows
        self._grams: dict[LayerKind, torch.Tensor] | None = None  # for `--allocation search`, kept across its runs

    def windows(self) -> torch.Tensor:
        """The calibration windows (built once; the same for statistics, fusion and compensation)."""
        if self._windows is None:
            calib, samples = self.calibration.calib, self.calibration.calib_samples
            if calib == GENERATED_CALIBRATION:
                if self.progress and is_offloaded(self.model):
                    tqdm.write(f"hywia: note: --calib self writes its windows in "
                               f"{generation_steps(samples, self.calibration.seq_len)} decoding steps, each streaming "
                               "every offloaded layer; --calib mix (shipped text) skips them", file=sys.stderr)
                self._windows = self_calibration_windows(self.model, self.tokenizer, samples,
                                                         self.calibration.seq_len, self.runtime.seed, self.progress,
                                                         execution_device(self.model))
            else:
                _, passages = calibration_source(calib)
                self._windows = calibration_windows(self.tokenizer, passages, samples, self.calibration.seq_len,
                                                    self.runtime.seed)
        return self._windows

    def share_windows(self, other: Pipeline) -> None:
        """Read `other`'s calibration windows (the same model and calibration settings): a bench's pipelines would
        build the same ones, and `--calib self` writes them with the model, at a cost."""
        if (other.model, other.calibration, other.runtime.seed) != (self.model, self.calibration, self.runtime.seed):
            raise ValueError("only a pipeline over the same model, calibration and seed can share its windows")
        self._windows = other.windows()

    def prepare(self, config: PruneConfig) -> PreparedRun:
        """Resolve and check a config against this model before any expensive work."""
        if (config.attention, config.layers) != (self.attention, self.layers):
            raise InvalidRequestError("a pipeline's runs share its --attention and --layers")
        criterion, allocation, compensation = check_method(config)
        config = dataclasses.replace(config, round_to=resolve_round_to(self.adapter, self.layer_indices,
                                                                       config.round_to))
        floor = getattr(allocation[1], "floor", None)
        check_plan_request(self.adapter, self.layers, config.ratio, config.round_to, floor)
        if getattr(compensation[1], "holdout", 0) > 0 and self.calibration.calib_samples < 2:
            raise InvalidRequestError("lstsq chooses its ridge on held-out windows, so it needs --calib-samples 2 or "
                                      "more; or give --compensate lstsq:holdout=0")
        criterion.check_windows(self.calibration.calib_samples)
        depth_weights = log_depth_weights(self.layer_indices) if allocation[0] == "log" else None
        keep = allocate_uniform(self.adapter, self.layer_indices, config.ratio, config.round_to, depth_weights)
        return PreparedRun(config, criterion, allocation, compensation, keep)

    def calibrate(self, runs: list[PreparedRun], *, gradients: bool = False) -> None:
        """Stage `calibrate`: the windows, and one statistics pass with everything the runs' criteria read
        (and the gradient statistics in any case with `gradients`)."""
        gradients = gradients or any(v.criterion.needs_gradients for v in runs)
        activations = any(v.criterion.needs_activations for v in runs)
        folds = max((v.criterion.gradient_folds for v in runs), default=1)
        with self.log.stage("calibrate"):
            windows = self.windows()  # built inside the stage, so its cost is counted there
            if gradients or activations:
                self.stats = collect_statistics(
                    self.model, self.adapter, self.layer_indices, windows, gradients=gradients,
                    activations=activations, progress=self.progress, path=self.runtime.importance_path,
                    store=self.runtime.activation_store, folds=folds,
                )

    def score(self, prepared: PreparedRun) -> dict[LayerKind, torch.Tensor]:
        """Stage `score`: one score per group, on the dense model."""
        with self.log.stage("score"):
            specs = {i: self.adapter.group_specs(self.adapter.layers()[i]) for i in self.layer_indices}
            ctx = ScoringContext(self.model, self.adapter, self.layer_indices, specs, self.windows(), prepared.keep,
                                 self.runtime.seed, self.stats, self.progress, self._allocator(prepared),
                                 prepared.compensation[0], partial(self._kept_groups, prepared),
                                 getattr(prepared.compensation[1], "ridge", ScoringContext.ridge),
                                 getattr(prepared.allocation[1], "attention_weight", 1.0))
            with torch.random.fork_rng():
                torch.manual_seed(self.runtime.seed)
                return prepared.criterion.score(ctx)

    def plan(self, prepared: PreparedRun, scores: dict[LayerKind, torch.Tensor]) -> PruningPlan:
        """Stage `plan`: the allocation's counts (for `search`, the profile searched from the global allocation's),
        and the highest-scored groups of each kind kept."""
        with self.log.stage("plan"):
            return self._select(prepared, scores, search=True)

    def _select(self, prepared: PreparedRun, scores: dict[LayerKind, torch.Tensor],
                search: bool = False) -> PruningPlan:
        allocate = self._allocator(prepared)
        keep = allocate(scores) if allocate else prepared.keep
        name, settings = prepared.allocation
        if search and name == "search":
            mode, compensation = prepared.compensation
            if self._grams is None and mode != "none":
                self._grams = projection_grams(self.model, self.adapter, self.layer_indices, self.windows(),
                                               self.progress)
            keep, prepared.search = search_profile(
                self.model, self.adapter, self.layer_indices, scores, keep, self.windows(), mode, settings,
                grams=self._grams, round_to=prepared.config.round_to,
                ridge=getattr(compensation, "ridge", ScoringContext.ridge), seed=self.runtime.seed,
                progress=self.progress)
        return select(self.adapter, scores, keep)

    def _kept_groups(self, prepared: PreparedRun, scores: dict[LayerKind, torch.Tensor]) -> dict[LayerKind, list[int]]:
        """The groups the plan from `scores` keeps, per (layer, kind): what a criterion may check a candidate by."""
        return {(layer, kind): kept for layer, kinds in self._select(prepared, scores).layers.items()
                for kind, kept in kinds.items()}

    def compensate(self, model: nn.Module, plan: PruningPlan, compensation: tuple[str, object]) -> dict[str, int]:
        """Stage `compensate`: the removed groups' contribution folded into what stays, on the calibration windows
        (`compensation`: a mode and its settings, as `parse_compensation` gives them)."""
        mode, settings = compensation
        if mode == "none":
            return {}
        with self.log.stage("compensate"):
            adapter = self.adapter if model is self.model else adapter_for(model, self.attention)
            return compensate(model, adapter, plan, self.windows(), mode, progress=self.progress,
                              **dataclasses.asdict(settings))

    def cut(self, model: nn.Module, plan: PruningPlan) -> None:
        """Stage `cut`: the removed groups taken out of the tensors."""
        with self.log.stage("cut"):
            apply_plan(model, plan)

    def run(self, prepared: PreparedRun, *, in_place: bool) -> Pruned:
        """score -> plan -> compensate -> cut; on the model itself, or on a copy that leaves it dense."""
        scores = self.score(prepared)
        plan = self.plan(prepared, scores)
        if in_place:  # the dense model changes now: the search's Gram matrices describe it no more
            self._grams = None
        model = self.model if in_place else copy.deepcopy(self.model)
        chosen = self.compensate(model, plan, prepared.compensation)
        self.cut(model, plan)
        return Pruned(model, plan, prepared, chosen)

    def apply(self, plan: PruningPlan, compensation: str) -> nn.Module:
        """A saved plan on this (dense) model: compensate as `compensation` says, then cut, without scoring."""
        if plan.attention != self.attention:
            raise InvalidRequestError(f"the plan removes {plan.attention!r} groups; this pipeline {self.attention!r}")
        self.compensate(self.model, plan, parse_compensation(compensation))
        self.cut(self.model, plan)
        return self.model

    def summary(self, pruned: Pruned, decoder_before: int, params_before: int) -> dict:
        """The report's description of one run: what was asked, what came out, and the stages' costs."""
        adapter = adapter_for(pruned.model, self.attention)
        decoder_after = adapter.num_decoder_params()
        config = pruned.prepared.config
        record = {
            "criterion": config.criterion,
            "ratio_requested": config.ratio,
            "ratio_achieved": 1 - decoder_after / decoder_before,
            "params_before": params_before,
            "params_after": count_params(pruned.model),
            "decoder_params_before": decoder_before,
            "decoder_params_after": decoder_after,
            "layers_pruned": [self.layer_indices[0], self.layer_indices[-1] + 1],
            "attention": self.attention,
            "allocation": format_spec(*pruned.prepared.allocation),  # written out: defaults change between versions
            "compensate": format_spec(*pruned.prepared.compensation),
            "round_to": config.round_to,
            "importance_path": self.runtime.importance_path,
            "layers": [adapter.widths(layer) for layer in adapter.layers()],
            "calibration": {
                "text": calibration_description(self.calibration.calib),
                "samples": self.calibration.calib_samples,
                "seq_len": self.calibration.seq_len,
                "seed": self.runtime.seed,
            },
            "fusion": pruned.prepared.criterion.summary(),
        }
        if pruned.compensation:
            record["compensation_fits"] = pruned.compensation
        if pruned.prepared.search:
            record["profile_search"] = pruned.prepared.search
        if abs(record["ratio_achieved"] - config.ratio) > 0.01:
            record["ratio_note"] = (
                "achieved share differs from the request by more than 1 point: head granularity and the "
                "--layers range allow no closer split"
            )
        return record

    def _allocator(self, prepared: PreparedRun):
        """The score-dependent allocation criteria see: the global one, also for `search` (which starts from it;
        a criterion never waits for a search)."""
        name, settings = prepared.allocation
        if name not in ("global", "search"):
            return None
        return partial(allocate_global, self.adapter, self.layer_indices, prepared.config.ratio,
                       floor=settings.floor, round_to=prepared.config.round_to,
                       attention_weight=getattr(settings, "attention_weight", 1.0))
