import pytest
import torch

from hywia.importance import ScoringContext, available_criteria, collect_statistics, get_criterion
from hywia.importance.base import normalise
from hywia.importance.flap import fluctuation_scores
from hywia.importance.fusion import VIEWS, FusionAttention, HywiaFusion, granularities
from hywia.errors import InvalidRequestError
from hywia.models import adapter_for
from hywia.pruning import allocate_uniform, select

ALL = ["random", "magnitude", "taylor-vector", "taylor-element1", "taylor-element2", "wanda-sp", "flap", "fixed:0.5",
       "hywia", "obs"]


def _context(model, seed=0, attention="heads", ratio=0.3, path="layerwise"):
    adapter = adapter_for(model, attention)
    layers = [0, 1, 2, 3]
    batches = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(model, adapter, layers, batches, progress=False, path=path)
    specs = {i: adapter.group_specs(adapter.layers()[i]) for i in layers}
    keep = allocate_uniform(adapter, layers, ratio)

    def kept_groups(scores):
        plan = select(adapter, scores, keep)
        return {(layer, kind): kept for layer, kinds in plan.layers.items() for kind, kept in kinds.items()}

    return ScoringContext(model, adapter, layers, specs, batches, keep, seed, stats, progress=False,
                          kept_groups=kept_groups)


def test_registry_lists_every_criterion():
    assert {"random", "magnitude", "taylor-vector", "taylor-element1", "taylor-element2", "wanda-sp", "fixed",
            "hywia"} <= set(available_criteria())
    with pytest.raises(InvalidRequestError):
        get_criterion("nope")
    with pytest.raises(InvalidRequestError):
        get_criterion("fixed:2")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("name", ALL)
def test_every_criterion_scores_every_group(tiny_model_factory, family, name):
    ctx = _context(tiny_model_factory(family))
    scores = get_criterion(name).score(ctx)
    for layer, spec in ctx.items():
        score = scores[(layer, spec.kind)]
        assert score.shape == (spec.count,) and torch.isfinite(score).all()


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_groups(tiny_model_factory, name):
    plans = []
    for _ in range(2):
        ctx = _context(tiny_model_factory("llama"), seed=3)
        plans.append(select(ctx.adapter, get_criterion(name).score(ctx), ctx.keep))
    assert plans[0] == plans[1]


def test_statistics_match_autograd(tiny_model_factory):
    """grad is the mean of per-sample gradients and fisher the mean of their squares."""
    from hywia.importance.collect import lm_loss

    model = tiny_model_factory("llama")
    ctx = _context(model, path="plain")
    name = "model.layers.1.mlp.down_proj.weight"
    param = model.get_parameter(name)
    grads = []
    for sample in ctx.batches:
        param.grad = None
        lm_loss(model, sample[None]).backward()
        grads.append(param.grad.clone())
    grads = torch.stack(grads)
    torch.testing.assert_close(ctx.stats.grad[name], grads.mean(0), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ctx.stats.fisher[name], grads.square().mean(0), rtol=1e-4, atol=1e-9)


def test_fine_and_coarse_follow_their_definitions(tiny_model_factory):
    ctx = _context(tiny_model_factory("llama"), path="plain")
    fine = get_criterion("taylor-element1").score(ctx)
    coarse = get_criterion("taylor-vector").score(ctx)
    layer, spec = next(iter(ctx.items()))
    s = spec.slices[0]
    name = ctx.full_name(layer, s)
    saliency = (ctx.stats.grad[name] * ctx.param(layer, s.param)).movedim(s.dim, 0).reshape(spec.count, -1)
    assert (fine[(layer, spec.kind)] >= coarse[(layer, spec.kind)] - 1e-12).all()  # triangle inequality
    assert fine[(layer, spec.kind)][0] >= saliency[0].abs().sum()


def test_fixed_blend_endpoints_are_the_granularities(tiny_model_factory):
    ctx = _context(tiny_model_factory("llama"))
    fine = get_criterion("fixed:1").score(ctx)
    element = get_criterion("taylor-element1").score(ctx)
    for key in fine:
        torch.testing.assert_close(fine[key], element[key])


def test_fusion_starts_at_equal_weights_and_learns(tiny_model_factory):
    attention = FusionAttention(seed=0)
    alpha = attention([torch.randn(5, 3, dtype=torch.float64) for _ in VIEWS], torch.randn(5, dtype=torch.float64))
    torch.testing.assert_close(alpha, torch.full((5, len(VIEWS)), 1 / len(VIEWS), dtype=torch.float64))
    ctx = _context(tiny_model_factory("llama"))
    fine, coarse, scale = granularities(ctx)
    normalised = {"fine": fine, "coarse": coarse, "fluctuation": normalise(fluctuation_scores(ctx))}
    untrained = HywiaFusion(steps=0).score(ctx)
    three_views = HywiaFusion(steps=0, views="fine+coarse+fluctuation").score(ctx)
    for key in fine:
        default_blend = sum(normalised[view][key] for view in VIEWS) / len(VIEWS)
        torch.testing.assert_close(untrained[key], default_blend * scale[key])
        torch.testing.assert_close(three_views[key], sum(view[key] for view in normalised.values()) / 3 * scale[key])
    learned = HywiaFusion(steps=5, batch_size=2)
    learned.score(ctx)
    summary = learned.summary()
    assert summary["steps"] == 5 and summary["alpha_mean"]["fine"] != pytest.approx(1 / len(VIEWS), abs=1e-6)
    assert sum(summary["alpha_mean"].values()) == pytest.approx(1.0)
    assert all(p.requires_grad for p in ctx.model.parameters())


@pytest.mark.parametrize("compensate", ["none", "lstsq"])
def test_soft_gates_replace_a_closed_group_as_the_surgery_will(tiny_model_factory, compensate):
    """A closed gate zeroes the group's channels without compensation, and puts their calibration mean back with it."""
    from hywia.importance.fusion import _gated, _replacements

    ctx = _context(tiny_model_factory("llama"))
    ctx.compensate = compensate
    specs = {(layer, spec.kind): spec for layer, spec in ctx.items()}
    key = (1, "mlp")
    gates = {key: torch.ones(specs[key].count)}
    gates[key][:3] = 0.0
    seen = []
    with _gated(ctx, specs, gates, _replacements(ctx, specs)), torch.no_grad():
        handle = ctx.model.model.layers[1].mlp.down_proj.register_forward_pre_hook(  # runs after the gate's hook
            lambda m, args: seen.append(args[0]))
        ctx.model(input_ids=ctx.batches[:1])
    handle.remove()
    closed = seen[0][0, :, :3]
    mean = ctx.stats.act_sum["model.layers.1.mlp.down_proj.weight"][:3] / ctx.stats.tokens
    torch.testing.assert_close(closed, torch.zeros_like(closed) if compensate == "none" else mean.expand_as(closed))


def test_fusion_with_global_allocation_learns_layer_scales(tiny_model_factory):
    from functools import partial

    from hywia.pruning import allocate_global

    ctx = _context(tiny_model_factory("llama"), ratio=0.3)
    ctx.allocate = partial(allocate_global, ctx.adapter, ctx.layer_indices, 0.3)
    fusion = HywiaFusion(steps=4, batch_size=2)
    scores = fusion.score(ctx)
    shifts = [row["log_scale_learned_shift"] for row in fusion.summary()["per_layer"]]
    assert any(abs(v) > 1e-6 for v in shifts)
    keep = ctx.allocate(scores)
    assert all(1 <= keep[key] <= score.numel() for key, score in scores.items())


@pytest.mark.parametrize("learn", ["blend", "scales"])
def test_fusion_learns_only_what_it_is_told(tiny_model_factory, learn):
    """`learn` picks what the steps update; the other part stays at its start (equal weights, unshifted scales)."""
    from functools import partial

    from hywia.pruning import allocate_global

    ctx = _context(tiny_model_factory("llama"), ratio=0.3)
    ctx.allocate = partial(allocate_global, ctx.adapter, ctx.layer_indices, 0.3)
    fusion = HywiaFusion(steps=4, batch_size=2, learn=learn)
    fusion.score(ctx)
    rows = fusion.summary()["per_layer"]
    shifted = any(abs(row["log_scale_learned_shift"]) > 1e-6 for row in rows)
    equal = all(abs(a - 1 / len(VIEWS)) < 1e-9 for row in rows for a in row["alpha"].values())
    assert (shifted, equal) == ((False, False) if learn == "blend" else (True, True))


@pytest.mark.parametrize("compensate", ["none", "bias"])
def test_straight_through_fusion_learns_on_the_loss_of_the_hard_cut(tiny_model_factory, compensate):
    """Its first step's loss is the loss of the starting blend (equal weights) cut hard, removed groups replaced as
    the surgery will, on the windows the step drew."""
    from hywia.importance.fusion import _held_out_loss

    ctx = _context(tiny_model_factory("llama"))
    ctx.compensate = compensate
    fusion = HywiaFusion(steps=1, batch_size=3, straight_through=True)
    fusion.score(ctx)
    drawn = torch.randint(ctx.batches.shape[0], (3,), generator=torch.Generator().manual_seed(ctx.seed))
    start = HywiaFusion(steps=0).score(ctx)
    cut = float(_held_out_loss(ctx, ctx.kept_groups(start), ctx.batches[drawn]).mean())
    assert fusion.summary()["loss_first"] == pytest.approx(cut, rel=1e-5)
    soft = HywiaFusion(steps=1, batch_size=3)
    soft.score(ctx)
    assert soft.summary()["loss_first"] != pytest.approx(cut, rel=1e-3)


def test_fusion_step_recomputes_layers_and_chunks_the_head_without_changing_the_gradient(tiny_model_factory,
                                                                                           monkeypatch):
    """The fusion's memory savers (each layer recomputed in the backward, the head a few tokens at a time) give the
    loss and the gates' gradient of the plain batch backward."""
    from hywia.importance import layerwise
    from hywia.importance.fusion import _gated, _recomputed
    from hywia.importance.statistics import lm_loss

    monkeypatch.setattr(layerwise, "HEAD_CHUNK_ELEMENTS", 300 * 7)  # 7 tokens a chunk: several chunks per window
    ctx = _context(tiny_model_factory("llama"))
    specs = {(layer, spec.kind): spec for layer, spec in ctx.items()}
    for param in ctx.model.parameters():
        param.requires_grad_(False)
    ids = ctx.batches[:3]
    results = []
    for saving in (False, True):
        gate = torch.full((specs[(2, "mlp")].count,), 0.7, requires_grad=True)
        with _gated(ctx, specs, {(2, "mlp"): gate}, None):
            if saving:
                with _recomputed(ctx.adapter.layers()):
                    loss = layerwise.chunked_loss(ctx.model.lm_head, layerwise.final_hidden(ctx.model, ids), ids)
            else:
                loss_tensor = lm_loss(ctx.model, ids)
                loss_tensor.backward()
                loss = loss_tensor.item()
        results.append((loss, gate.grad))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    assert results[0][1].abs().sum() > 0
    torch.testing.assert_close(results[1][1], results[0][1])
    assert "forward" not in vars(ctx.adapter.layers()[0])  # the layers' own forward is back


def test_bfloat16_learning_runs_the_model_in_bfloat16_and_learns_about_what_float32_learns(tiny_model_factory):
    """`precision=bfloat16` autocasts the learning's forward (and its recomputation in the backward); the gates, the
    blend and the returned scores keep their dtypes, and the learned blend is float32's to bfloat16's rounding."""
    results = {}
    for precision in ("model", "bfloat16"):
        ctx = _context(tiny_model_factory("llama"))
        seen, head = set(), set()
        handle = ctx.model.model.layers[1].self_attn.q_proj.register_forward_hook(
            lambda module, args, out: seen.add(out.dtype))
        head_handle = ctx.model.lm_head.register_forward_hook(lambda module, args, out: head.add(out.dtype))
        fusion = HywiaFusion(steps=4, batch_size=2, validate=0, precision=precision)
        scores = fusion.score(ctx)
        handle.remove()
        head_handle.remove()
        assert all(score.dtype == torch.float64 for score in scores.values())
        assert head == {torch.float32}  # the head is never autocast: no bfloat16 copy of its weight per chunk
        results[precision] = (seen, fusion.summary())
    assert results["model"][0] == {torch.float32} and torch.bfloat16 in results["bfloat16"][0]
    full, half = results["model"][1], results["bfloat16"][1]
    assert (full["learned_in"], half["learned_in"]) == ("float32", "bfloat16")
    assert half["loss_first"] == pytest.approx(full["loss_first"], rel=2e-2)
    assert half["alpha_mean"]["fine"] != pytest.approx(0.5, abs=1e-6)
    assert half["alpha_mean"]["fine"] == pytest.approx(full["alpha_mean"]["fine"], abs=2e-2)


@pytest.mark.parametrize(("dtype", "native", "expected"), [(torch.float32, True, torch.bfloat16),
                                                           (torch.float32, False, None),
                                                           (torch.bfloat16, True, None),
                                                           (torch.float16, True, None)])
def test_auto_precision_learns_in_bfloat16_only_for_a_float32_model_on_native_bfloat16(tiny_model_factory,
                                                                                     monkeypatch, dtype, native,
                                                                                     expected):
    from hywia.importance.fusion import learning_autocast

    model = tiny_model_factory("llama").to(dtype)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert learning_autocast("auto", model) == expected
    assert learning_autocast("model", model) is None and learning_autocast("bfloat16", model) == torch.bfloat16


def test_geometric_pool_blends_the_views_logs(tiny_model_factory):
    ctx = _context(tiny_model_factory("llama"))
    fine, _, scale = granularities(ctx)
    fluctuation = normalise(fluctuation_scores(ctx))
    geometric = HywiaFusion(steps=0, pool="geometric").score(ctx)
    for key in fine:
        product = (fine[key] * fluctuation[key]).sqrt()
        torch.testing.assert_close(geometric[key], product / product.mean() * scale[key])
    learned = HywiaFusion(steps=3, batch_size=2, pool="geometric")
    learned.score(ctx)
    assert learned.summary()["alpha_mean"]["fine"] != pytest.approx(0.5, abs=1e-6)


def test_fusion_of_one_view_is_that_views_criterion(tiny_model_factory):
    ctx = _context(tiny_model_factory("llama"))
    alone = HywiaFusion(steps=0, views="fine").score(ctx)
    element = get_criterion("taylor-element1").score(ctx)
    for key in element:
        torch.testing.assert_close(alone[key], element[key])


def test_fusion_can_blend_the_obs_view(tiny_model_factory):
    ctx = _context(tiny_model_factory("llama"))
    fusion = HywiaFusion(steps=2, batch_size=2, views="fine+obs")
    scores = fusion.score(ctx)
    assert set(fusion.summary()["alpha_mean"]) == {"fine", "obs"}
    assert all(torch.isfinite(score).all() for score in scores.values())


def _folded_context(model, batches, ratio=0.3):
    """A context over `batches` whose statistics keep two folds, under a global allocation."""
    from functools import partial

    from hywia.pruning import allocate_global

    ctx = _context(model, ratio=ratio)
    ctx.batches = batches
    ctx.stats = collect_statistics(model, ctx.adapter, ctx.layer_indices, batches, progress=False, folds=2)
    ctx.allocate = partial(allocate_global, ctx.adapter, ctx.layer_indices, ratio)
    return ctx


def test_crossfit_blends_one_folds_views_on_the_other_folds_windows(tiny_model_factory, monkeypatch):
    """Every step's loss is taken on windows outside the fold whose views it blends (window i in fold i % 2)."""
    from hywia.importance import fusion as fusion_module

    model = tiny_model_factory("llama")
    batches = torch.randint(0, 300, (6, 24), generator=torch.Generator().manual_seed(1))
    ctx = _folded_context(model, batches)
    events = []  # ("views", fold) when a fold's views are blended, ("window", index) when a window runs

    class Recorded(dict):
        def __init__(self, views, fold):
            super().__init__(views)
            self.fold = fold

        def __getitem__(self, view):
            events.append(("views", self.fold))
            return super().__getitem__(view)

    real_sources, real_final_hidden = fusion_module._crossfit_sources, fusion_module.final_hidden

    def recorded_sources(*args):
        sources, pools = real_sources(*args)
        return [(Recorded(views, fold), tokens) for fold, (views, tokens) in enumerate(sources)], pools

    def recorded_final_hidden(model, ids):
        events.append(("window", next(i for i in range(6) if torch.equal(batches[i], ids[0]))))
        return real_final_hidden(model, ids)

    monkeypatch.setattr(fusion_module, "_crossfit_sources", recorded_sources)
    monkeypatch.setattr(fusion_module, "final_hidden", recorded_final_hidden)
    fusion = HywiaFusion(steps=4, batch_size=2, crossfit=True)
    scores = fusion.score(ctx)
    assert fusion.summary()["crossfit"]
    folds, windows = [], 0
    for event, value in events:
        if event == "views":
            folds.append(value)
        else:
            windows += 1
            assert value % 2 != folds[-1]
    assert windows == 8 and set(folds) == {0, 1}
    assert all(torch.isfinite(score).all() for score in scores.values())


def test_crossfit_on_identical_windows_learns_what_the_plain_fusion_learns(tiny_model_factory):
    """With every window the same, each fold's views are every window's, so only the bookkeeping differs."""
    model = tiny_model_factory("llama")
    batches = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(2)).repeat(4, 1)
    results = []
    for crossfit in (False, True):
        ctx = _folded_context(model, batches)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            results.append(HywiaFusion(steps=4, batch_size=2, crossfit=crossfit).score(ctx))
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-5, atol=1e-12)


def test_crossfit_asks_the_calibration_pass_for_folds_only_when_it_learns():
    assert get_criterion("hywia:crossfit=true").gradient_folds == 2
    assert get_criterion("hywia:crossfit=true:steps=0").gradient_folds == 1
    assert get_criterion("hywia").gradient_folds == 1


@pytest.mark.parametrize("option,windows", [("crossfit=true", 1), ("crossfit=true:validate=0.5", 3),
                                            ("validate=0.25:margin=0", 1)])
def test_fusion_refuses_too_few_windows_before_calibrating(option, windows):
    with pytest.raises(InvalidRequestError, match="calib-samples"):
        get_criterion(f"hywia:{option}").check_windows(windows)
    get_criterion(f"hywia:{option}").check_windows(8)


@pytest.mark.parametrize("windows,held_out", [(1, 0), (4, 0), (5, 2), (64, 16)])
def test_default_fusion_holds_out_a_quarter_where_the_margin_can_judge_it(windows, held_out):
    """By default a quarter of the windows is held out to check the blend against each view; with fewer than two
    held out the margin has no standard error, so nothing is held out and no window count is refused."""
    fusion = get_criterion("hywia")
    fusion.check_windows(windows)
    fit, held = fusion._split(torch.arange(windows)[:, None])
    assert held.shape[0] == held_out and fit.shape[0] == windows - held_out


@pytest.mark.parametrize("option", ["views=fine+fine", "views=fine+nope", "views=", "views=fine:validate=1.0",
                                    "learn=blend+blend", "learn=views", "learn=", "validate=0.25:margin=-1",
                                    "pool=harmonic", "precision=float16"])
def test_fusion_settings_are_checked(option):
    with pytest.raises(InvalidRequestError):
        get_criterion(f"hywia:{option}")


def test_validated_fusion_returns_the_candidate_with_the_lowest_held_out_loss(tiny_model_factory):
    ctx = _context(tiny_model_factory("llama"))
    fusion = HywiaFusion(steps=2, batch_size=2, validate=0.5, margin=0)
    scores = fusion.score(ctx)
    summary = fusion.summary()
    assert summary["held_out_windows"] == 2 and set(summary["held_out_loss"]) == {"learned", *VIEWS}
    assert summary["choice"] == min(summary["held_out_loss"], key=summary["held_out_loss"].get)
    if summary["choice"] == "fine":
        expected = get_criterion("taylor-element1").score(ctx)
        for key in expected:
            torch.testing.assert_close(scores[key], expected[key])


def test_held_out_loss_is_the_loss_of_the_physically_pruned_model(tiny_model_factory):
    """Hard gates at zero (no compensation) remove the groups exactly: the loss of the cut model."""
    import copy

    from hywia.importance.collect import lm_loss
    from hywia.importance.fusion import _held_out_loss
    from hywia.pruning import apply_plan

    model = tiny_model_factory("llama")
    ctx = _context(model)
    scores = get_criterion("magnitude").score(ctx)
    held = ctx.batches[2:]
    gated = _held_out_loss(ctx, ctx.kept_groups(scores), held)
    pruned = copy.deepcopy(model)
    apply_plan(pruned, select(adapter_for(pruned, "heads"), scores, ctx.keep))
    with torch.no_grad():
        cut = [float(lm_loss(pruned, held[i:i + 1])) for i in range(held.shape[0])]
    assert gated.tolist() == pytest.approx(cut, rel=1e-5)


def test_a_view_replaces_the_learned_blend_only_when_it_is_lower_by_the_margin():
    """The paired standard error is that of the per-window differences; a view lower by 1.22 of them replaces the
    blend under margins 0 and 1, not 2; a view that is not lower never does; one window gives no error."""
    from hywia.importance.fusion import _choose

    learned = torch.tensor([4.0, 4.2, 4.4, 4.6], dtype=torch.float64)
    losses = {"learned": learned, "fine": learned - torch.tensor([0.1, 0.3, -0.1, 0.1], dtype=torch.float64),
              "fluctuation": learned + 0.5}
    error = (0.08 / 3) ** 0.5 / 2  # the differences' sample deviation over sqrt(4)
    assert _choose(losses, 0.0) == ("fine", {"fine": pytest.approx(error), "fluctuation": pytest.approx(0.0)})
    assert _choose(losses, 1.0)[0] == "fine" and _choose(losses, 2.0)[0] == "learned"
    one = {name: loss[:1] for name, loss in losses.items()}
    assert _choose(one, 0.0) == ("fine", {"fine": None, "fluctuation": None})
    assert _choose(one, 1.0)[0] == "learned"


def test_validated_fusion_judges_a_least_squares_cut_by_its_refit(tiny_model_factory):
    """Under `lstsq` the candidates' held-out losses are those of their cuts with the removed inputs predicted by
    least squares on the other windows, not replaced by their means."""
    import dataclasses

    from hywia.importance.refit import refit_held_out_losses

    ctx = dataclasses.replace(_context(tiny_model_factory("llama")), compensate="lstsq")
    fusion = HywiaFusion(steps=2, batch_size=2, validate=0.5, views="fine+obs")
    scores = fusion.score(ctx)
    summary = fusion.summary()
    fit, held = ctx.batches[:2], ctx.batches[2:]
    refit = refit_held_out_losses(ctx, {"chosen": ctx.kept_groups(scores)}, fit, held, ctx.ridge)["chosen"]
    assert summary["held_out_loss"][summary["choice"]] == pytest.approx(float(refit.mean()), rel=1e-9)
    assert set(summary["held_out_loss"]) == {"learned", "fine", "obs"}
