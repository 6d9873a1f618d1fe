import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import hywia  # noqa: F401
from hywia.io import save_model
from hywia.models import adapter_for
from hywia.pruning import PruningPlan, allocate_uniform, apply_plan, mask_plan, select
from hywia.pruning.compensate import compensate, input_moments


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
    moments = input_moments(dense, adapter, plan, ids)
    plain = mask_plan(copy.deepcopy(dense), plan)
    fixed = copy.deepcopy(dense)
    compensate(adapter_for(fixed), plan, moments, mode)
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


def test_bias_compensation_is_exact_for_constant_inputs(tiny_model_factory):
    """If a removed channel always carries the same value, a bias replaces it exactly."""
    model = tiny_model_factory("llama")
    adapter = adapter_for(model)
    layer = adapter.layers()[1]
    spec = next(s for s in adapter.group_specs(layer) if s.kind == "mlp")
    plan = PruningPlan("heads", {1: {"mlp": list(range(1, spec.count))}})
    x = torch.randn(50, spec.count, dtype=torch.float64)
    x[:, 0] = 3.0
    moments = {(1, "mlp"): (x.sum(0), x.T @ x, x.shape[0])}
    weight = layer.mlp.down_proj.weight.detach().clone()
    compensate(adapter, plan, moments, "bias")
    torch.testing.assert_close(layer.mlp.down_proj.bias.detach(), (weight[:, 0] * 3.0).float())
