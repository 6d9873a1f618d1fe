import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import hywia  # noqa: F401
from hywia.io import save_model
from hywia.models import adapter_for
from hywia.pruning import PruningPlan, allocate_uniform, apply_plan, mask_plan, select
from hywia.pruning.compensate import ProjectionMoments, compensate


def _plan(model, ratio=0.4):
    adapter = adapter_for(model)
    layers = [0, 1, 2, 3]
    generator = torch.Generator().manual_seed(0)
    scores = {(i, s.kind): torch.rand(s.count, generator=generator)
              for i in layers for s in adapter.group_specs(adapter.layers()[i])}
    return adapter, select(adapter, scores, allocate_uniform(adapter, layers, ratio))


@pytest.mark.parametrize("mode", ["bias", "lstsq"])
def test_compensation_shrinks_the_error_and_survives_surgery(tiny_model_factory, tiny_tokenizer, tmp_path, mode):
    dense = tiny_model_factory("qwen2")
    with torch.no_grad():  # give activations a mean, so there is something to compensate
        for layer in dense.model.layers:
            layer.mlp.up_proj.weight.add_(0.05)
    ids = torch.randint(0, 300, (8, 24), generator=torch.Generator().manual_seed(2))
    adapter, plan = _plan(dense)
    plain = mask_plan(copy.deepcopy(dense), plan)
    fixed = copy.deepcopy(dense)
    compensate(fixed, adapter_for(fixed), plan, ids, mode)
    masked_fixed = mask_plan(copy.deepcopy(fixed), plan)
    with torch.no_grad():
        reference = dense(input_ids=ids).logits
        error_plain = (plain(input_ids=ids).logits - reference).square().mean()
        error_fixed = (masked_fixed(input_ids=ids).logits - reference).square().mean()
    assert error_fixed < error_plain
    pruned = apply_plan(copy.deepcopy(fixed), plan)
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, masked_fixed(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)
    save_model(pruned, tiny_tokenizer, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.model.layers[0].mlp.down_proj.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, pruned(input_ids=ids).logits, atol=0, rtol=0)


def test_bias_compensation_is_exact_for_constant_inputs():
    """If a removed channel always carries the same value, a bias replaces it exactly."""
    weight = torch.randn(5, 4, dtype=torch.float64)
    x = torch.randn(50, 4, dtype=torch.float64)
    x[:, 0] = 3.0
    moments = ProjectionMoments(weight, torch.tensor([1, 2, 3]), torch.tensor([0]), "bias")
    moments.add(x)
    delta, bias, _ = moments.solve(ridge=0.0)
    assert delta is None
    torch.testing.assert_close(bias, weight[:, 0] * 3.0)


def test_least_squares_fits_the_removed_columns_from_the_kept_ones():
    """lstsq refits the kept columns and a bias to what the removed columns wrote: the ordinary least-squares
    solution without ridge, exact when the removed inputs are an affine function of the kept ones."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, dtype=torch.float64, generator=generator)
    kept, removed = torch.tensor([0, 1, 2]), torch.tensor([3, 4])
    x = torch.randn(200, 5, dtype=torch.float64, generator=generator)
    moments = ProjectionMoments(weight, kept, removed, "lstsq")
    moments.add(x)
    gram = moments.fit.gram.clone()
    delta, bias, _ = moments.solve(ridge=0.1)
    assert torch.equal(moments.fit.gram, gram)  # the ridge went onto the diagonal in place and came off exactly
    delta, bias, _ = moments.solve(ridge=0.0)
    design = torch.cat([x[:, kept], torch.ones(200, 1, dtype=torch.float64)], 1)
    expected = torch.linalg.lstsq(design, x[:, removed] @ weight[:, removed].T).solution.T
    torch.testing.assert_close(torch.cat([delta, bias[:, None]], 1), expected)
    x[:, removed] = x[:, kept[:2]] * 2.0 - 1.0
    exact = ProjectionMoments(weight, kept, removed, "lstsq")
    exact.add(x)
    delta, bias, _ = exact.solve(ridge=0.0)
    torch.testing.assert_close(x[:, kept] @ (weight[:, kept] + delta).T + bias, x @ weight.T)


def _o_proj_inputs(model, layer, ids):
    seen = []
    handle = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return torch.cat(seen)


def test_later_layers_are_fitted_on_the_pruned_model_inputs(tiny_model_factory):
    """Layer 1 is fitted on the inputs of the model whose layer 0 is already pruned and compensated, not on the
    dense model's: each layer sees what the pruned model will feed it."""
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(3))
    dense = tiny_model_factory("llama")
    adapter, plan = _plan(dense)
    plan = PruningPlan(plan.attention, {i: plan.layers[i] for i in (0, 1)})
    together = copy.deepcopy(dense)
    compensate(together, adapter_for(together), plan, ids, "lstsq")

    first_only = copy.deepcopy(together)  # layer 0 as the pass left it, layer 1 still dense
    first_only.model.layers[1].load_state_dict(dense.model.layers[1].state_dict(), strict=False)
    first_only.model.layers[1].self_attn.o_proj.bias = None
    mask_plan(first_only, PruningPlan(plan.attention, {0: plan.layers[0]}))
    weight = dense.model.layers[1].self_attn.o_proj.weight
    spec = next(s for s in adapter.group_specs(adapter.layers()[1]) if s.kind == "head")
    kept = torch.tensor([h * spec.gate_block + j for h in plan.layers[1]["head"] for j in range(spec.gate_block)])
    removed = torch.tensor(sorted(set(range(weight.shape[1])) - set(kept.tolist())))
    expected, stale = (ProjectionMoments(weight, kept, removed, "lstsq") for _ in range(2))
    expected.add(_o_proj_inputs(first_only, 1, ids))
    stale.add(_o_proj_inputs(dense, 1, ids))
    delta, bias, _ = expected.solve(ridge=1e-2)
    fitted = together.model.layers[1].self_attn.o_proj
    torch.testing.assert_close(fitted.weight[:, kept], (weight[:, kept].double() + delta).float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fitted.bias, bias.float(), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(stale.solve(ridge=1e-2)[1], bias, atol=1e-4)  # the dense inputs differ


def _regression(samples: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs whose removed columns are a linear function of the kept ones plus `noise`."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 40, dtype=torch.float64, generator=generator)
    mixing = torch.randn(30, 10, dtype=torch.float64, generator=generator)
    x[:, 30:] = x[:, :30] @ mixing * 0.3 + noise * torch.randn(samples, 10, dtype=torch.float64, generator=generator)
    return x, torch.randn(8, 40, dtype=torch.float64, generator=generator)


@pytest.mark.parametrize("samples, noise, expected", [(2000, 0.01, "ridge 0.0001"), (50, 10.0, "bias")])
def test_held_out_windows_choose_the_fit_that_generalises(samples, noise, expected):
    """With plenty of clean data the least regularised fit wins on held-out tokens; with few noisy tokens the fit
    overfits and the bias alone wins. The winner is refitted on every token."""
    x, weight = _regression(samples, noise, seed=0)
    kept, removed = torch.arange(30), torch.arange(30, 40)
    moments = ProjectionMoments(weight, kept, removed, "lstsq", validated=True)
    moments.add(x[: samples * 3 // 4])
    moments.add(x[samples * 3 // 4:], held_out=True)
    delta, bias, choice = moments.solve(ridge=1e-2)
    assert choice == expected
    everything = ProjectionMoments(weight, kept, removed, "bias" if expected == "bias" else "lstsq")
    everything.add(x)
    reference = everything.solve(ridge=1e-4)
    assert (delta is None) == (reference[0] is None)
    if delta is not None:
        torch.testing.assert_close(delta, reference[0])
    torch.testing.assert_close(bias, reference[1])


@pytest.mark.parametrize("decades, expected", [(0, "ridge 0.01"), (2, "ridge 0.0001"), (4, "ridge 1e-06")])
def test_decades_bound_the_ridges_the_held_out_windows_try(decades, expected):
    """Plenty of clean tokens favour the least regularised fit, so the choice lands on the grid's lower edge,
    `decades` powers of ten below the base ridge."""
    x, weight = _regression(2000, 1e-4, seed=0)
    moments = ProjectionMoments(weight, torch.arange(30), torch.arange(30, 40), "lstsq", validated=True)
    moments.add(x[:1500])
    moments.add(x[1500:], held_out=True)
    assert moments.solve(ridge=1e-2, decades=decades)[2] == expected


def test_holdout_compensation_reports_its_choices(tiny_model_factory):
    dense = tiny_model_factory("llama")
    ids = torch.randint(0, 300, (8, 24), generator=torch.Generator().manual_seed(2))
    adapter, plan = _plan(dense)
    fixed = copy.deepcopy(dense)
    chosen = compensate(fixed, adapter_for(fixed), plan, ids, "lstsq", holdout=0.25)
    projections = sum(len(keep) for keep in plan.layers.values())
    assert sum(chosen.values()) == projections
    assert set(chosen) <= {"bias"} | {f"ridge {1e-2 * 10.0 ** k:g}" for k in range(-2, 3)}
    assert compensate(dense, adapter, plan, ids, "lstsq") == {"ridge 0.01": projections}


def test_holdout_needs_two_windows_and_is_reported(tiny_model_factory):
    from hywia.errors import InvalidRequestError
    from hywia.pipeline import Pipeline
    from hywia.settings import CalibrationConfig, PruneConfig

    model = tiny_model_factory("llama")
    config = PruneConfig(ratio=0.2, layers="0:4", criterion="magnitude", compensate="lstsq:holdout=0.5")
    lone = Pipeline(model, None, layers="0:4", calibration=CalibrationConfig(calib_samples=1, seq_len=16),
                    windows=torch.zeros(1, 16, dtype=torch.long), progress=False)
    with pytest.raises(InvalidRequestError, match="--calib-samples 2 or more"):
        lone.prepare(config)
    validated = PruneConfig(ratio=0.2, layers="0:4", criterion="hywia:validate=0.5:margin=0", compensate="bias")
    with pytest.raises(InvalidRequestError, match="hywia:validate .* --calib-samples 2 or more"):
        lone.prepare(validated)
    pipeline = Pipeline(model, None, layers="0:4", calibration=CalibrationConfig(calib_samples=4, seq_len=16),
                        windows=torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0)),
                        progress=False)
    prepared = pipeline.prepare(config)
    pipeline.calibrate([prepared])
    pruned = pipeline.run(prepared, in_place=False)
    summary = pipeline.summary(pruned, adapter_for(model).num_decoder_params(), sum(p.numel() for p in model.parameters()))
    specs = {(i, s.kind): s.count for i in range(4) for s in adapter_for(model).group_specs(model.model.layers[i])}
    cut = sum(len(kept) < specs[(i, kind)] for i, keep in pruned.plan.layers.items() for kind, kept in keep.items())
    assert cut > 0 and sum(summary["compensation_fits"].values()) == cut  # one fit per projection that lost groups
