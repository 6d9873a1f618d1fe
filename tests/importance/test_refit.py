import copy

import pytest
import torch

from hywia.importance import ScoringContext, collect_statistics, get_criterion
from hywia.importance.refit import refit_held_out_losses
from hywia.importance.statistics import lm_loss
from hywia.models import adapter_for
from hywia.pruning import allocate_uniform, apply_plan, select
from hywia.pruning.compensate import compensate


def _windows(count, seed):
    return torch.randint(0, 300, (count, 24), generator=torch.Generator().manual_seed(seed))


def _context(model, attention, layers, ratio):
    adapter = adapter_for(model, attention)
    batches = _windows(6, 0)
    stats = collect_statistics(model, adapter, layers, batches, progress=False)
    specs = {i: adapter.group_specs(adapter.layers()[i]) for i in layers}
    keep = allocate_uniform(adapter, layers, ratio)
    return ScoringContext(model, adapter, layers, specs, batches, keep, 0, stats, progress=False,
                          compensate="lstsq")


def _losses(model, windows):
    """The LM loss of each window."""
    with torch.no_grad():
        return [float(lm_loss(model, windows[i:i + 1])) for i in range(len(windows))]


@pytest.mark.parametrize("attention", ["none", "heads"])
def test_one_pruned_layer_loses_what_the_compensated_cut_model_loses(tiny_model_factory, attention):
    """Where only one projection is pruned, the dense inputs it is fitted on are the pruned model's: the predicted
    inputs give the loss of the model compensated by `lstsq` (same ridge, no held-out choice) and cut."""
    model = tiny_model_factory("llama")
    layer = 2
    ctx = _context(model, attention, [layer], 0.1)
    if attention == "heads":  # the heads alone: the MLP's inputs would differ from the dense ones
        ctx.specs[layer] = [spec for spec in ctx.specs[layer] if spec.kind != "mlp"]
    plan = select(ctx.adapter, get_criterion("magnitude").score(ctx), ctx.keep)
    plan.layers[layer] = {kind: kept for kind, kept in plan.layers[layer].items()
                          if kind in {spec.kind for spec in ctx.specs[layer]}}
    kept = {(layer, kind): groups for kind, groups in plan.layers[layer].items()}
    fit, held_out = ctx.batches[:4], _windows(3, 1)
    predicted = refit_held_out_losses(ctx, {"cut": kept}, fit, held_out, ridge=0.05)["cut"]

    pruned = copy.deepcopy(model)
    compensate(pruned, adapter_for(pruned, attention), plan, fit, "lstsq", ridge=0.05, holdout=0)
    apply_plan(pruned, plan)
    assert predicted.tolist() == pytest.approx(_losses(pruned, held_out), rel=1e-5)
    assert float(predicted.mean()) != pytest.approx(sum(_losses(model, held_out)) / len(held_out), rel=1e-3)


def test_every_candidate_is_judged_on_its_own_cut(tiny_model_factory):
    """A cut that removes nothing changes nothing, and candidates judged in one pass do not affect each other."""
    model = tiny_model_factory("llama")
    ctx = _context(model, "heads", [1, 2], 0.2)
    everything = {(layer, spec.kind): list(range(spec.count)) for layer, spec in ctx.items()}
    scores = get_criterion("magnitude").score(ctx)
    magnitude = {(layer, kind): kept for layer, kinds in select(ctx.adapter, scores, ctx.keep).layers.items()
                 for kind, kept in kinds.items()}
    held_out = _windows(2, 3)
    losses = refit_held_out_losses(ctx, {"dense": everything, "magnitude": magnitude}, ctx.batches, held_out, 0.01)
    assert losses["dense"].tolist() == pytest.approx(_losses(model, held_out), rel=1e-5)
    alone = refit_held_out_losses(ctx, {"magnitude": magnitude}, ctx.batches, held_out, 0.01)["magnitude"]
    assert torch.equal(losses["magnitude"], alone)
    assert float(losses["magnitude"].mean()) != pytest.approx(float(losses["dense"].mean()), rel=1e-3)


def test_gated_off_groups_replaced_by_their_core_prediction_are_the_refit_cut(tiny_model_factory):
    """The fusion's `refit` objective with hard gates (core on, the rest off) is the cut that keeps the core, its
    removed inputs predicted by least squares: the held-out loss of that cut."""
    from hywia.importance.fusion import _frozen, _gated, _replacements
    from hywia.importance.refit import core_predictions

    model = tiny_model_factory("llama")
    layer = 1
    ctx = _context(model, "none", [layer], 0.1)
    spec = ctx.specs[layer][0]
    key = (layer, spec.kind)
    core = list(range(0, spec.count, 2))
    fit, held_out = ctx.batches[:4], _windows(3, 2)
    predictions = core_predictions(ctx, {key: core}, fit, ridge=0.05)
    gates = {key: torch.zeros(spec.count).index_fill_(0, torch.tensor(core), 1.0)}
    with _frozen(model), _gated(ctx, {key: spec}, gates, _replacements(ctx, {key: spec}, predictions)):
        gated = _losses(model, held_out)
    expected = refit_held_out_losses(ctx, {"core": {key: core}}, fit, held_out, ridge=0.05)["core"]
    assert expected.tolist() == pytest.approx(gated, rel=1e-5)


def test_the_refit_objective_learns_and_reports_its_core(tiny_model_factory):
    from hywia.importance.fusion import HywiaFusion

    ctx = _context(tiny_model_factory("llama"), "heads", [0, 1, 2, 3], 0.3)
    fusion = HywiaFusion(steps=2, batch_size=2, refit=True, validate=0)  # the objective alone, no held-out check
    scores = fusion.score(ctx)
    share = fusion.summary()["refit_core_share"]
    assert 0.25 <= share < 1 and all(torch.isfinite(score).all() for score in scores.values())
