"""HyWIA: fine- and coarse-grained importance blended per group by a learned attention.

Every group is seen three ways: fine-grained, from its individual weights (sum of |g*W|, LLM-Pruner's element
criterion); coarse-grained, as a whole, by the loss (sum over its tensor slices of |sum of g*W|, the vector
criterion); and coarse-grained by what its output carries beyond its mean (the fluctuation of the output
projection's input channels times their columns' squared norms, FLAP's metric), which is what a removal costs once
compensation puts the mean back. For every group one token per view is built from that view's features (log of the
normalised score, its rank in the layer, the layer's dispersion of that score); a query comes from the context
(depth, structure kind, how far the views' rankings agree in this layer). alpha = softmax(q.k / sqrt(d)) over the
tokens and I = sum over the blended views (`views`, by default fine and fluctuation) of alpha_v * score_v. The
attention starts at equal weights; its few parameters are learned end to end (`steps`, default 24; 0 keeps the
equal blend) with the model frozen: I drives soft gates sigmoid((I - tau) / T) on head outputs and MLP channels
at the target ratio (tau = the ratio's quantile of I in that layer and kind, T annealed towards 0), minimising the
LM loss on the calibration windows; a gated-off channel is replaced by its mean when the pruning compensates (as
the surgery will), by zero when it does not.

With a global allocation the soft mask sees it: one threshold over all pruned layers on log(I) + log(scale)
- log(parameters per group) (+ log of the allocation's `attention_weight` for attention groups), where each
(layer, kind)'s scale starts at its mean raw fine-grained saliency and is learned with the blend, so the end-to-end
objective also decides how much each layer gives up.

Learning is not a sure gain (issue 17's protocol: held-out text of other genres, BENCHMARKS.md "Eighth session"): on
SmolLM2-135M the equal blend (`steps=0`) is 10-12% better at 50% removed under both calibration sources, on
Gemma-3-270M the learned blend is 32% better at 50% (mostly its attention: the layer scales alone gain 10%),
and at 20% the two are within 2% on both models. The learned blend stays the default, as the smaller worst case.

The third view is this project's addition to the two the HyWIA method defines: with least-squares compensation, ranking
by the loss-based views alone kept far worse groups at 50% (the ablation in BENCHMARKS.md). `views` chooses the views
blended; `obs` (the output error left after a least-squares refit, hywia.importance.obs) is the one that sees what
`--compensate lstsq` will do. By default the blend leaves the loss-based coarse view out (`views=fine+fluctuation`;
`views=fine+coarse+fluctuation` restores the three-view blend of earlier versions): over nine cross-domain cells
(SmolLM2-135M at 20/35/50% under two calibration sources, Gemma-3-270M at 20% under both and 50% under one) the
two-view blend is 3.5% better on average and its worst loss is 5.2% (SmolLM2 at 20% under `wiki`), against 12.1% for
the three views (SmolLM2 at 50% under `mix`), BENCHMARKS.md "Tenth" and "Eleventh session". It loses on SmolLM2 at
20% (3-5%). The coarse view is still computed, for the context's rank agreement; it is only not blended.

With `refit` (under `--compensate lstsq`) the objective sees the least-squares surgery instead: a gated-off group
is replaced by its least-squares prediction from the core groups (hywia.importance.refit.core_predictions): those
taken to stay whatever the blend learns, the highest under equal weights once 1.5 times what the starting allocation
removes is left out (at least a quarter of each layer and kind). The refit lets kept groups stand in for removed
ones; the mean cannot, so under it the views that suit the refit (obs) look worse than they are. The predictions
are fitted once, on the dense model's inputs.

With `validate` > 0 (by default 0.25) that share of the calibration windows (the last ones) is held out: the blend
learns on the rest, then the learned blend and each view alone (its own raw scores, so under a global allocation it
is exactly that view's criterion) are cut hard at the target, removed groups replaced as the surgery will (under
`lstsq`: by their least-squares prediction from the kept groups, fitted on the other windows,
hywia.importance.refit; under `bias`: by their mean), and the one with the lowest LM loss on the held-out windows is
returned: the fusion can become any single view when learning does not pay on windows it was not fitted on. With
`margin` > 0 (by default 2) a view must beat the learned blend by that many standard errors of the paired
per-window difference; with fewer than two windows to hold out there is no such error, so the check is skipped and
the blend learns on every window. Measured (BENCHMARKS.md "Sixteenth" and "Twentieth session"):
- Under the shipped prose sources (`mix`, `wiki`) held-out windows favour the fluctuation view, built from
  activation statistics on that source: with the margin the check switched to it on Gemma-3-270M at 50% and lost
  9% on foreign text, so it stayed off while those were the default calibration.
- Under `self` (the default calibration since) it kept the learned blend in all five cells (SmolLM2-135M at
  20/35/50%, Gemma-3-270M at 20/50%), and the prunes came out 0.5% better on average on foreign text, within the
  noise of learning on 48 windows instead of 64. It is on by default because issue 17 asks that the blend's choice
  be checked on windows it was not fitted on, at about 90 CPU s more per prune on SmolLM2-135M as first measured
  (about 16 of them since saved by a cheaper loss pass, hywia.importance.refit).
- It does not rescue SmolLM2-135M at 50%: there the held-out windows barely separate the fluctuation view from the
  blend, while on foreign text that view is 4-6% better.

With `pool=geometric` the views' logs are blended instead of their normalised scores, so that the view whose
scores spread further does not decide the order whatever alpha says. Measured (BENCHMARKS.md "Seventeenth
session"): level with the default on SmolLM2-135M's six cells, 18-24% worse on Gemma-3-270M at 20%, where it
loses dialogue and code, so it is off.

With `crossfit` the blend never learns on the windows its gradient views were measured on. The calibration pass
also keeps the fine and coarse terms of each half of the windows (interleaved: `Statistics.fold_taylor`); the
steps alternate between the halves, blending one half's views while the loss is taken on windows of the other.
The scores returned blend the views of every window with the attention so learned. Fluctuation and obs come from
all windows in both halves (sums over thousands of tokens, not a gradient mean that cancels), as do the context's
rank agreements. It tests one suspicion: that without it the objective rewards the coarse view in-sample, since the
first-order change of the calibration loss when a group is gated off is the coarse term on those same windows.
Measured, it barely moves the blend or the perplexity on foreign text: within 2.2% of the plain learned blend in
all four SmolLM2-135M cells, 1.9% better on Gemma-3-270M at 50% (BENCHMARKS.md "Ninth session"). Too small a
difference to choose a default on, so it is off.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..errors import InvalidRequestError
from ..measure import release_freed_memory
from ..offload import execution_device
from .base import Criterion, LayerKind, ScoringContext, normalise, register_criterion
from .statistics import TaylorTerms, fold_of
from .collect import lm_loss
from .flap import fluctuation_scores
from ..calibration.capture import forward_replaced
from ..calibration.prediction import InputPrediction
from .layerwise import HEAD_CHECK_TOKENS, chunked_loss, final_hidden, head_is_last
from .obs import OptimalBrainSurgeon
from .refit import core_predictions, refit_held_out_losses
from .taylor import taylor_scores

FINE_ORDER = 1
COARSE_ORDER = 1
CORE_MARGIN = 1.5  # `refit`: the core leaves out this many times the groups the starting allocation removes
MIN_CORE_SHARE = 0.25  # and keeps at least this share (the global allocation's floor)
VIEWS = ("fine", "fluctuation")  # the default views (BENCHMARKS.md "Eleventh session")
KNOWN_VIEWS = ("fine", "coarse", "fluctuation", "obs")
LEARNABLE = ("blend", "scales")  # what the fusion's steps can update
POOLS = ("arithmetic", "geometric")  # how the weighted views combine (FusionSettings.pool)
PRECISIONS = ("auto", "model", "bfloat16")  # what the learning computes in (FusionSettings.precision)
CROSSFIT_FOLDS = 2


def raw_granularities(ctx: ScoringContext, terms: dict[LayerKind, TaylorTerms] | None = None
                      ) -> dict[str, dict[LayerKind, torch.Tensor]]:
    """The fine- and coarse-grained scores as their criteria give them (loss units), from `terms` (default: every
    window's)."""
    return {"fine": taylor_scores(ctx, "fine", FINE_ORDER, terms),
            "coarse": taylor_scores(ctx, "coarse", COARSE_ORDER, terms)}


def layer_scales(fine: dict[LayerKind, torch.Tensor]) -> dict[LayerKind, float]:
    """Each layer-kind's scale, the mean raw fine-grained saliency: it turns a blend of normalised scores back into
    loss units, so that blended scores stay comparable across layers for a global allocation."""
    return {key: float(value.mean()) for key, value in fine.items()}


def granularities(
    ctx: ScoringContext,
) -> tuple[dict[LayerKind, torch.Tensor], dict[LayerKind, torch.Tensor], dict[LayerKind, float]]:
    """Normalised (mean 1 per layer and kind) fine- and coarse-grained scores, and each layer-kind's scale."""
    raw = raw_granularities(ctx)
    return normalise(raw["fine"]), normalise(raw["coarse"]), layer_scales(raw["fine"])


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two score vectors: how far the two granularities agree on a layer."""
    if a.numel() < 2:
        return 1.0
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


@dataclass(frozen=True)
class BlendSettings:
    alpha: float = 0.5  # weight of the fine-grained view

    positional: ClassVar[str] = "alpha"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"the blend weight alpha must lie in [0, 1], got {self.alpha}")


@register_criterion("fixed")
class FixedBlend(Criterion):
    """A fixed blend A * fine + (1 - A) * coarse of the normalised scores (`fixed:0.5`)."""

    needs_gradients = True
    Settings = BlendSettings

    def score(self, ctx: ScoringContext) -> dict[LayerKind, torch.Tensor]:
        alpha = self.settings.alpha
        fine, coarse, scale = granularities(ctx)
        return {key: (alpha * fine[key] + (1 - alpha) * coarse[key]) * scale[key] for key in fine}

    def summary(self) -> dict:
        return {"alpha_fine": self.settings.alpha}


def _token_features(score: torch.Tensor) -> torch.Tensor:
    """[n, 3]: log score, centred rank in [-1/2, 1/2], the layer's dispersion of log scores."""
    log = score.clamp_min(1e-12).log()
    rank = score.argsort().argsort().double() / max(score.numel() - 1, 1) - 0.5
    return torch.stack([log, rank, log.std().expand_as(log) if score.numel() > 1 else torch.zeros_like(log)], 1)


class FusionAttention(nn.Module):
    """One token per view of each group, attended by one context query; returns alpha [n, views]."""

    def __init__(self, n_views: int = len(VIEWS), n_features: int = 3, n_context: int = 5, dim: int = 8,
                 seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.key = nn.Linear(n_features, dim, dtype=torch.float64)
        self.view = nn.Parameter(torch.zeros(n_views, dim, dtype=torch.float64))
        self.query = nn.Linear(n_context, dim, dtype=torch.float64)
        with torch.no_grad():
            # Zero keys give equal weights; a non-zero query lets the keys' gradients flow from step one.
            self.key.weight.zero_()
            self.key.bias.zero_()
            self.query.weight.copy_(torch.randn(dim, n_context, generator=generator, dtype=torch.float64) * 0.5)
            self.query.bias.copy_(torch.randn(dim, generator=generator, dtype=torch.float64) * 0.5)

    def forward(self, tokens: list[torch.Tensor], context: torch.Tensor) -> torch.Tensor:
        keys = torch.stack([self.key(features) + self.view[i] for i, features in enumerate(tokens)], 1)
        logits = keys @ self.query(context) / math.sqrt(self.dim)
        return logits.softmax(-1)


@dataclass(frozen=True)
class FusionSettings:
    """The blend's learning: `steps` Adam steps (0: the equal blend, nothing learned) on `batch_size` calibration
    windows each, at learning rate `lr`; the soft gates' temperature anneals geometrically from start to end
    (`log_temperature_*` for the global allocation's gates on log score per parameter). `views`: the views blended,
    joined by '+'; `validate`: the share of calibration windows held out to choose between the learned blend and
    each view alone (0: none; skipped, the blend learning on every window, where `margin` > 0 and fewer than
    two windows would be held out: one window gives no standard error, so no view could replace the blend);
    `margin`: how many standard errors of the paired per-window difference a view's held-out loss must lie below
    the learned blend's to replace it (0: the lowest mean wins); `refit`: under
    `lstsq`, a gated-off group is replaced by its least-squares prediction from the core groups
    (`core_predictions`) instead of its mean; `learn`: what the steps update, joined by '+':
    `blend` (the attention) and `scales` (the layer scales of a global allocation); the part left out stays at its
    start (equal weights, the mean raw fine-grained saliency), so the two can be judged apart; `straight_through`:
    the model runs under the cut the pipeline would make from the current blend (each group kept or replaced whole)
    while the gradient is the soft gates', so the loss learned on is the cut's, not that of a model with every group
    partly open; `crossfit`: the blend learns on windows other than those its gradient views were measured on
    (module docstring); `pool`: `arithmetic` blends the normalised scores, sum of alpha_v * score_v, `geometric`
    their logs, the product of score_v ** alpha_v, whose ranking within a layer does not depend on how each view is
    normalised; `precision`: what the learning's forward and backward compute in (`learning_autocast`): `model`
    (the default) the model's own dtype, `bfloat16` bfloat16 autocast, `auto` bfloat16 only for a float32 model on
    a device that computes bfloat16 natively; the gates, the blend and every other stage stay as they were.
    Measured (BENCHMARKS.md "Twenty-third session"): the same quality on foreign text, a fifth to a third less CPU
    time in the score stage, but 57 MB more peak memory on SmolLM2-135M, past issue 18's goal, so not the default."""

    steps: int = 24
    batch_size: int = 4
    lr: float = 0.05
    temperature_start: float = 0.3
    temperature_end: float = 0.01
    log_temperature_start: float = 1.0
    log_temperature_end: float = 0.05
    views: str = "+".join(VIEWS)
    validate: float = 0.25
    margin: float = 2.0
    refit: bool = False
    straight_through: bool = False
    learn: str = "+".join(LEARNABLE)
    crossfit: bool = False
    pool: str = "arithmetic"
    precision: str = "model"

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("steps must be >= 0, batch_size >= 1 and lr > 0")
        for field, allowed in (("views", KNOWN_VIEWS), ("learn", LEARNABLE)):
            names = getattr(self, field).split("+")
            if len(set(names)) != len(names) or not set(names) <= set(allowed):
                raise ValueError(f"{field} must be distinct names among {', '.join(allowed)} joined by '+', "
                                 f"got {getattr(self, field)!r}")
        if not 0.0 <= self.validate < 1.0:
            raise ValueError(f"validate must lie in [0, 1), got {self.validate}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if min(self.temperature_start, self.temperature_end, self.log_temperature_start,
               self.log_temperature_end) <= 0:
            raise ValueError("temperatures must be > 0")

    @property
    def learned(self) -> list[str]:
        """The parts the steps update (`learn`), as a list."""
        return self.learn.split("+")


@register_criterion("hywia")
class HywiaFusion(Criterion):
    """The learned fusion (see module docstring)."""

    needs_gradients = True
    needs_activations = True
    Settings = FusionSettings

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self._summary: dict = {}

    @property
    def gradient_folds(self) -> int:
        return CROSSFIT_FOLDS if self._crossfits else 1

    @property
    def _crossfits(self) -> bool:
        return self.settings.crossfit and self.settings.steps > 0

    def check_windows(self, count: int) -> None:
        fit, _ = self._split(torch.empty(count, 0))  # refuses `validate` without a window to hold out
        if self._crossfits and fit.shape[0] < CROSSFIT_FOLDS:
            raise InvalidRequestError(f"{self.name}:crossfit learns on one half of the windows it does not hold out "
                                      f"and measures on the other, so it needs {CROSSFIT_FOLDS} or more of them "
                                      "(--calib-samples)")

    def score(self, ctx: ScoringContext) -> dict[LayerKind, torch.Tensor]:
        names = self.settings.views.split("+")
        raw = {**raw_granularities(ctx), "fluctuation": fluctuation_scores(ctx)}
        if "obs" in names:
            raw["obs"] = OptimalBrainSurgeon().score(ctx)
        normalised = {v: normalise(scores) for v, scores in raw.items()}
        fine, coarse = normalised["fine"], normalised["coarse"]
        scale = layer_scales(raw["fine"])
        views = {v: normalised[v] for v in names}
        fit, held_out = self._split(ctx.batches)
        keys = list(fine)
        n_layers = len(ctx.adapter.layers())
        tokens = {k: [_token_features(views[v][k]) for v in names] for k in keys}
        # What each step blends, and the windows its loss is taken on: every view on every window, or with
        # `crossfit` one fold's gradient views on the other fold's windows (module docstring).
        sources, pools = [(views, tokens)], [fit]
        if self._crossfits:
            sources, pools = _crossfit_sources(ctx, names, normalised, fit)
        agreement = {k: spearman(fine[k], coarse[k]) for k in keys}
        fluctuation_agreement = {k: spearman(fine[k], normalised["fluctuation"][k]) for k in keys}
        context = {
            k: torch.tensor(
                [k[0] / max(n_layers - 1, 1), float(k[1] != "mlp"), float(k[1] == "mlp"), agreement[k],
                 fluctuation_agreement[k]],
                dtype=torch.float64,
            )
            for k in keys
        }
        attention = FusionAttention(n_views=len(names), seed=ctx.seed)
        # Log of each (layer, kind)'s scale: it ranks the layers against each other in a global allocation.
        # Initialised at the mean raw saliency; learned with the blend when the allocation is global.
        log_scale = nn.Parameter(torch.tensor([math.log(max(scale[k], 1e-30)) for k in keys], dtype=torch.float64))
        initial_log_scale = log_scale.detach().clone()

        combine = partial(_pooled, geometric=self.settings.pool == "geometric")

        def blend(source: int | None = None) -> tuple[dict[LayerKind, torch.Tensor], dict[LayerKind, torch.Tensor]]:
            """The blended scores and alphas, of `sources[source]`'s views (None: every window's)."""
            source_views, source_tokens = (views, tokens) if source is None else sources[source]
            alphas = {k: attention(source_tokens[k], context[k]) for k in keys}
            return {k: combine([source_views[v][k] for v in names], alphas[k].unbind(1)) for k in keys}, alphas

        equal = {k: combine([views[v][k] for v in names], None) for k in keys}
        # The soft mask sees the global allocation: one threshold over all layers, on score per parameter.
        keep = ctx.keep if ctx.allocate is None else ctx.allocate({k: equal[k] * scale[k] for k in keys})
        specs = {(layer, spec.kind): spec for layer, spec in ctx.items()}
        refit = self.settings.refit and ctx.compensate == "lstsq" and self.settings.steps > 0
        cores = _cores(equal, keep, ctx.keep) if refit else {}
        replacements = _replacements(ctx, specs, core_predictions(ctx, cores, fit, ctx.ridge) if cores else None)
        if not self.settings.steps:
            losses = []
        elif ctx.allocate is None:
            losses = self._learn_uniform(ctx, attention, blend, pools, replacements)
        else:
            losses = self._learn_global(ctx, attention, blend, log_scale, keys, keep, pools, replacements)
        with torch.no_grad():
            scores, alphas = blend()
        learned_log_scale = log_scale.detach()
        learned = {k: scores[k] * float(learned_log_scale[i].exp()) for i, k in enumerate(keys)}
        candidates = {"learned": learned, **{v: raw[v] for v in names}}
        validation = _validation_losses(ctx, candidates, fit, held_out) if held_out.shape[0] else {}
        choice, errors = _choose(validation, self.settings.margin) if validation else ("learned", {})
        self._summary = {
            "views": names,
            "alpha_mean": {v: float(torch.cat([a[:, i] for a in alphas.values()]).mean()) for i, v in enumerate(names)},
            "per_layer": [
                {"layer": k[0], "kind": k[1], "alpha": {v: float(alphas[k][:, j].mean()) for j, v in enumerate(names)},
                 "rank_agreement": agreement[k],
                 "log_scale_learned_shift": float(learned_log_scale[i] - initial_log_scale[i])}
                for i, k in enumerate(keys)
            ],
            "steps": self.settings.steps,
            "crossfit": self._crossfits,
            "learned_in": (str(learning_autocast(self.settings.precision, ctx.model)
                                or next(ctx.model.parameters()).dtype).removeprefix("torch.") if losses else None),
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "held_out_windows": int(held_out.shape[0]),
            "held_out_loss": {name: float(per_window.mean()) for name, per_window in validation.items()},
            "held_out_paired_se": errors,
            "margin": self.settings.margin,
            "choice": choice,
            "refit_core_share": (sum(len(c) for c in cores.values()) / sum(specs[k].count for k in cores)
                                 if cores else None),
        }
        return candidates[choice]

    def summary(self) -> dict:
        return self._summary

    def _split(self, batches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(windows the blend learns on, windows held out to validate it): the last `validate` share, at least
        one, and at least one left to learn on; none where a margin asks for a standard error that fewer than two
        held-out windows cannot give."""
        if self.settings.validate == 0:
            return batches, batches[:0]
        held = min(max(math.ceil(self.settings.validate * batches.shape[0]), 1), batches.shape[0] - 1)
        if self.settings.margin > 0 and held < 2:
            return batches, batches[:0]
        if batches.shape[0] < 2:
            raise InvalidRequestError(f"{self.name}:validate holds out windows to choose on, "
                                      "so it needs --calib-samples 2 or more")
        return batches[:-held], batches[-held:]

    def _learn_uniform(self, ctx: ScoringContext, attention: FusionAttention, blend, pools: list[torch.Tensor],
                       replacements: dict | None) -> list[float]:
        """Soft gates per layer and kind at the uniform allocation's share (tau = that share's quantile of I)."""
        if "blend" not in self.settings.learned:
            return []  # a uniform allocation has no layer scales to learn
        specs = {(layer, spec.kind): spec for layer, spec in ctx.items()}
        removed_share = {k: 1 - ctx.keep[k] / specs[k].count for k in specs}

        def gates(temperature: float, source: int
                  ) -> tuple[dict[LayerKind, torch.Tensor], dict[LayerKind, torch.Tensor]]:
            scores, _ = blend(source)
            soft = {k: torch.sigmoid((scores[k] - torch.quantile(scores[k], share)) / temperature)
                    for k, share in removed_share.items() if share > 0}
            return soft, {k: score.detach() for k, score in scores.items()}

        temperature = (self.settings.temperature_start, self.settings.temperature_end)
        return self._optimise(ctx, list(attention.parameters()), gates, temperature, pools, replacements)

    def _learn_global(
        self, ctx: ScoringContext, attention: FusionAttention, blend, log_scale: nn.Parameter,
        keys: list[LayerKind], keep: dict[LayerKind, int], pools: list[torch.Tensor], replacements: dict | None,
    ) -> list[float]:
        """Soft gates on log score per parameter against one global threshold, learning the layer scales too."""
        specs = {(layer, spec.kind): spec for layer, spec in ctx.items()}
        layers = ctx.adapter.layers()
        cost = {k: sum(layers[k[0]].get_parameter(s.param).numel() // specs[k].count for s in specs[k].slices)
                for k in keys}
        target = sum((specs[k].count - keep[k]) * cost[k] for k in keys)
        costs = torch.cat([torch.full((specs[k].count,), float(cost[k]), dtype=torch.float64) for k in keys])

        def gates(temperature: float, source: int
                  ) -> tuple[dict[LayerKind, torch.Tensor], dict[LayerKind, torch.Tensor]]:
            scores, _ = blend(source)
            z = torch.cat([scores[k].clamp_min(1e-12).log() + log_scale[i] - math.log(cost[k])
                           + (0.0 if k[1] == "mlp" else math.log(ctx.attention_weight)) for i, k in enumerate(keys)])
            order = z.detach().argsort()
            cut = int(torch.searchsorted(costs[order].cumsum(0), torch.tensor(float(target), dtype=torch.float64)))
            tau = z.detach()[order[min(cut, z.numel() - 1)]]
            soft = torch.sigmoid((z - tau) / temperature)
            current = {k: scores[k].detach() * float(log_scale[i].detach().exp()) for i, k in enumerate(keys)}
            return dict(zip(keys, soft.split([specs[k].count for k in keys]))), current

        learned = self.settings.learned
        params = [*(attention.parameters() if "blend" in learned else ()),
                  *([log_scale] if "scales" in learned else ())]
        temperature = (self.settings.log_temperature_start, self.settings.log_temperature_end)
        return self._optimise(ctx, params, gates, temperature, pools, replacements)

    def _optimise(self, ctx: ScoringContext, params: list, gates_at, temperature: tuple[float, float],
                  pools: list[torch.Tensor], replacements: dict | None) -> list[float]:
        """Minimise the LM loss of the frozen model under the soft gates, annealing T, gated-off groups replaced by
        `replacements` (`_replacements`); returns the loss per step. Step s draws its windows from pool
        i = s % len(pools), and `gates_at(T, i)` gives the soft gates and the current scores of that pool's views;
        with `straight_through` the model runs under the cut the pipeline makes from those scores
        (`ctx.kept_groups`: allocation and selection), the gradient passing as if through the soft gates."""
        if any(pool.shape[0] == 0 for pool in pools):
            raise InvalidRequestError("the learned fusion needs calibration samples")
        if self.settings.straight_through and ctx.kept_groups is None:
            raise InvalidRequestError("hywia:straight_through needs the pipeline's plan selection "
                                      "(ScoringContext.kept_groups)")
        device = next(ctx.model.parameters()).device
        optimizer = torch.optim.Adam(params, lr=self.settings.lr)
        steps, batch_size = self.settings.steps, self.settings.batch_size
        specs = {(layer, spec.kind): spec for layer, spec in ctx.items()}
        generator = torch.Generator().manual_seed(ctx.seed)
        t_start, t_end = temperature
        losses = []
        gates: dict[LayerKind, torch.Tensor] = {}
        head = ctx.model.get_output_embeddings()
        chunked = head_is_last(ctx.model, pools[0][:1, :HEAD_CHECK_TOKENS].to(device))
        autocast = learning_autocast(self.settings.precision, ctx.model)
        computes = execution_device(ctx.model).type
        with _frozen(ctx.model), _gated(ctx, specs, gates, replacements), _recomputed(ctx.adapter.layers()):
            for step in tqdm(range(steps), desc="fusion", disable=not ctx.progress, leave=False):
                t = t_start * (t_end / t_start) ** (step / max(steps - 1, 1))
                source = step % len(pools)
                batches = pools[source]
                soft, current = gates_at(t, source)
                # The model runs one window at a time on leaf copies of the gates, whose gradients add up over
                # the batch; one backward through the blend then follows. Same gradients as the whole batch at
                # once, with one window's activations (and allocator fragmentation) at a time.
                forward = _hard_cut(ctx.kept_groups(current), soft) if self.settings.straight_through else soft
                gates.clear()
                gates.update({k: g.detach().to(device, torch.float32).requires_grad_() for k, g in forward.items()})
                pick = torch.randint(batches.shape[0], (batch_size,), generator=generator)
                optimizer.zero_grad()
                loss = 0.0
                for index in pick.tolist():
                    ids = batches[index:index + 1].to(device)
                    cast = torch.autocast(computes, dtype=autocast) if autocast else nullcontext()
                    if chunked:  # the vocabulary-wide logits of the window never exist at once
                        with cast:  # the head stays in the model's dtype: no copy of its weight per chunk
                            final = final_hidden(ctx.model, ids)
                        loss += chunked_loss(head, final, ids, share=1 / batch_size)
                    else:
                        with cast:
                            window_loss = lm_loss(ctx.model, ids) / batch_size
                        window_loss.backward()
                        loss += window_loss.item()
                losses.append(loss)
                reached = [k for k, g in gates.items() if g.grad is not None]
                torch.autograd.backward([soft[k] for k in reached], [gates[k].grad.to(soft[k]) for k in reached])
                optimizer.step()
                release_freed_memory()  # bfloat16's per-op weight copies fragment the heap: its extra peak 106 -> 57 MB
        return losses


def learning_autocast(precision: str, model: nn.Module) -> torch.dtype | None:
    """The dtype the learning autocasts to, None for the model's own: `auto` takes bfloat16 only for a float32
    model whose execution device computes bfloat16 natively (a CUDA device that supports it, a CPU with AVX512-BF16
    or AMX), where it cut a third of a learning step's CPU time at the same quality; elsewhere it could be slower
    or lose precision the model has."""
    if precision == "model":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    device = execution_device(model)
    native = (torch.cuda.is_bf16_supported() if device.type == "cuda" else
              device.type == "cpu" and any(getattr(torch.cpu, probe, lambda: False)()
                                           for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")))
    return torch.bfloat16 if native and next(model.parameters()).dtype == torch.float32 else None


def _crossfit_sources(ctx: ScoringContext, names: list[str], normalised: dict[str, dict[LayerKind, torch.Tensor]],
                      fit: torch.Tensor) -> tuple[list[tuple[dict, dict]], list[torch.Tensor]]:
    """For each fold: (its views and their tokens, the windows of `fit` outside it). The gradient views are the
    fold's own terms (`Statistics.fold_taylor`, window i in fold i % folds); the others are every window's."""
    if len(ctx.stats.fold_taylor) != CROSSFIT_FOLDS:
        raise InvalidRequestError(f"hywia:crossfit needs statistics in {CROSSFIT_FOLDS} folds "
                                  "(collect_statistics(folds=...))")
    sources, pools = [], []
    for fold, terms in enumerate(ctx.stats.fold_taylor):
        fold_views = {v: normalise(scores) for v, scores in raw_granularities(ctx, terms).items()}
        views = {v: fold_views.get(v, normalised[v]) for v in names}
        sources.append((views, {k: [_token_features(views[v][k]) for v in names] for k in fold_views["fine"]}))
        others = [i for i in range(fit.shape[0]) if fold_of(i, CROSSFIT_FOLDS) != fold]
        pools.append(fit[others])
    return sources, pools


def _pooled(scores: list[torch.Tensor], weights: tuple[torch.Tensor, ...] | None, geometric: bool) -> torch.Tensor:
    """The views' normalised scores combined with `weights` (one weight per group and view; None: equal). A
    geometric pool is brought back to mean 1, as each view is, so that the layer scales alone still set how layers
    compare under a global allocation."""
    terms = [score.clamp_min(1e-12).log() for score in scores] if geometric else scores
    pooled = sum(terms) / len(terms) if weights is None else sum(w * term for w, term in zip(weights, terms))
    if not geometric:
        return pooled
    pooled = pooled.exp()
    return pooled / pooled.mean()


def _hard_cut(kept: dict[LayerKind, list[int]], soft: dict[LayerKind, torch.Tensor]) -> dict[LayerKind, torch.Tensor]:
    """Gates of 1 on the kept groups and 0 elsewhere, for every (layer, kind) that `soft` gates."""
    return {k: torch.zeros_like(g).index_fill_(0, torch.tensor(kept[k], dtype=torch.long), 1.0)
            for k, g in soft.items()}


def _choose(losses: dict[str, torch.Tensor], margin: float) -> tuple[str, dict[str, float | None]]:
    """The candidate kept, and each view's standard error of its per-window loss difference to the learned blend
    (None with one held-out window). The view with the lowest mean held-out loss replaces the blend only when it is
    lower by more than `margin` such standard errors: with a few held-out windows the means differ by noise, and
    switching on noise gives up the blend for nothing. Without an error only `margin` 0 can switch."""
    learned = losses["learned"]
    count = learned.numel()
    errors = {name: float((loss - learned).std() / math.sqrt(count)) if count > 1 else None
              for name, loss in losses.items() if name != "learned"}
    best = min(losses, key=lambda name: float(losses[name].mean()))
    gap = float((learned - losses[best]).mean())  # 0 when the blend itself is lowest
    switch = gap > 0 and (margin == 0 or (errors[best] is not None and gap > margin * errors[best]))
    return (best if switch else "learned"), errors


def _validation_losses(ctx: ScoringContext, candidates: dict[str, dict[LayerKind, torch.Tensor]], fit: torch.Tensor,
                       held_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each candidate's LM loss on each held-out window, its groups allocated and selected as the pipeline will
    (`ctx.kept_groups`) and the removed ones replaced as the surgery will: predicted by least squares fitted on the
    other windows (hywia.importance.refit) for `lstsq`, by their mean for `bias`, by zero for `none`."""
    if ctx.kept_groups is None:
        raise InvalidRequestError("hywia:validate needs the pipeline's plan selection (ScoringContext.kept_groups)")
    kept = {name: ctx.kept_groups(scores) for name, scores in candidates.items()}
    if ctx.compensate == "lstsq":
        return refit_held_out_losses(ctx, kept, fit, held_out, ctx.ridge)
    return {name: _held_out_loss(ctx, groups, held_out) for name, groups in kept.items()}


@torch.no_grad()
def _held_out_loss(ctx: ScoringContext, kept: dict[LayerKind, list[int]], batches: torch.Tensor) -> torch.Tensor:
    """The LM loss of each window of `batches` with the groups outside `kept` gated off hard, replaced by their mean
    (or zero without compensation)."""
    specs = {(layer, spec.kind): spec for layer, spec in ctx.items()}
    device = next(ctx.model.parameters()).device
    gates = {}
    for key, spec in specs.items():
        gate = torch.ones(spec.count, device=device)
        if key in kept:
            gate.zero_()[kept[key]] = 1.0
        gates[key] = gate
    with _frozen(ctx.model), _gated(ctx, specs, gates, _replacements(ctx, specs)):
        return torch.tensor([float(lm_loss(ctx.model, batches[index:index + 1].to(device)))
                             for index in range(batches.shape[0])], dtype=torch.float64)


@contextmanager
def _recomputed(layers: list[nn.Module]):
    """Each decoder layer keeps only its input for the backward and runs again inside it (activation
    checkpointing): the step's memory is one layer's activations, not all of them, and an offloaded layer's weights
    are not held between its forward and backward. The recomputation repeats the same operations on the same
    inputs, so the gradients are the same."""

    def recomputing(run: Callable) -> Callable:
        return lambda *args, **kwargs: checkpoint(run, *args, use_reentrant=False, **kwargs)

    with forward_replaced(layers, wrap=recomputing):
        yield


@contextmanager
def _frozen(model: nn.Module):
    """No weight of the model takes gradients while the fusion learns; restored afterwards."""
    previous = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    try:
        yield
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(previous[name])
        model.train(was_training)


def _cores(equal: dict[LayerKind, torch.Tensor], keep: dict[LayerKind, int],
           uniform_keep: dict[LayerKind, int]) -> dict[LayerKind, list[int]]:
    """The groups of each (layer, kind) that the blend will keep whatever it learns: the highest under equal
    weights, leaving out CORE_MARGIN times as many as the starting allocation removes (or the uniform one, if more),
    but at least MIN_CORE_SHARE of the groups."""
    cores = {}
    for key, score in equal.items():
        count = score.numel()
        removed = max(count - keep[key], count - uniform_keep[key])
        size = max(count - math.ceil(CORE_MARGIN * removed), math.ceil(MIN_CORE_SHARE * count))
        cores[key] = sorted(score.argsort(descending=True)[:size].tolist())
    return cores


def _replacements(ctx: ScoringContext, specs: dict, predictions: dict[LayerKind, InputPrediction] | None = None
                  ) -> dict[LayerKind, Callable[[torch.Tensor], torch.Tensor]] | None:
    """What a gated-off channel is replaced by: where the surgery compensates, its least-squares prediction from
    the core groups where `predictions` has one, else its calibration mean; zero where the surgery does not
    compensate (None)."""
    if ctx.compensate == "none":
        return None
    replacements = {}
    for key, spec in specs.items():
        mean = ctx.stats.act_sum[f"{ctx.adapter.layer_name(key[0])}.{spec.gate_module}.weight"] / ctx.stats.tokens
        replacements[key] = partial(_replaced, mean=mean, prediction=(predictions or {}).get(key))
    return replacements


def _replaced(x: torch.Tensor, mean: torch.Tensor, prediction: InputPrediction | None) -> torch.Tensor:
    """The replacement of every input of `x`: its mean, or for the inputs `prediction` covers, their prediction."""
    replacement = mean.to(x.device, x.dtype).expand_as(x)
    return replacement if prediction is None else prediction.fill(x, replacement.clone())


@contextmanager
def _gated(ctx: ScoringContext, specs: dict, gates: dict[LayerKind, torch.Tensor],
           replacements: dict[LayerKind, Callable[[torch.Tensor], torch.Tensor]] | None):
    """Each group's contribution (the input of its output projection) passes by its current gate; the rest of the
    way it is replaced (`replacements`: the input's replacement given the input) or zero."""
    hooks = []
    for (layer, kind), spec in specs.items():
        module = ctx.model.get_submodule(f"{ctx.adapter.layer_name(layer)}.{spec.gate_module}")

        def hook(module, args, key=(layer, kind), block=spec.gate_block):
            gate = gates.get(key)
            if gate is None:
                return None
            gate = gate.to(args[0].dtype).repeat_interleave(block)
            gated = args[0] * gate
            if replacements is not None:
                gated = gated + (1 - gate) * replacements[key](args[0])
            return (gated,) + tuple(args[1:])

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in hooks:
            handle.remove()
