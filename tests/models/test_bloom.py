"""Bloom: fused per-head query_key_value, MHA, ALiBi slopes that must follow the heads a layer keeps."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

import hywia  # noqa: F401  (registers the pruned classes)
from family_checks import (
    check_every_criterion,
    check_generate_matches_forward,
    check_ratio_zero_changes_nothing,
    check_reload,
    check_removal_equals_zeroing,
    randomise,
    scored_plan,
)
from hywia.models import adapter_for
from hywia.models.remote.hywia_alibi import alibi_slopes
from hywia.pruning import PruningPlan, apply_plan


def tiny_bloom(heads: int = 4, seed: int = 0):
    """hidden 64, MLP 256 (Bloom's 4x), 4 layers."""
    torch.manual_seed(seed)
    config = BloomConfig(vocab_size=300, hidden_size=64, n_layer=4, n_head=heads)
    return randomise(AutoModelForCausalLM.from_config(config, dtype=torch.float32), seed)


def test_groups_follow_the_fused_interleaved_layout():
    model = tiny_bloom()
    layer = adapter_for(model).layers()[0]
    head, mlp = adapter_for(model).group_specs(layer)
    assert (head.kind, head.count, head.gate_module, head.gate_block) == ("kv", 4, "self_attention.dense", 16)
    assert (mlp.kind, mlp.count, mlp.gate_module, mlp.gate_block) == ("mlp", 256, "mlp.dense_4h_to_h", 1)
    # The rows a head owns compute exactly the q, k and v that BloomAttention._reshape hands that head.
    attn, x = layer.self_attention, torch.randn(1, 1, 64)
    with torch.no_grad():
        q, k, v = attn._reshape(attn.query_key_value(x))
        rows = head.indices(torch.tensor([2]), head.slices[0])
        own = torch.nn.functional.linear(x, attn.query_key_value.weight[rows], attn.query_key_value.bias[rows])
    torch.testing.assert_close(own.view(3, 16), torch.stack([q[0, 2, 0], k[0, 2, 0], v[0, 2, 0]]))


def test_ratio_zero_changes_nothing():
    check_ratio_zero_changes_nothing(tiny_bloom())


@pytest.mark.parametrize("attention", ["heads", "kv"])
def test_physical_removal_equals_zeroing(attention):
    model = tiny_bloom()
    plan = scored_plan(model, 0.4, attention)
    assert all(len(keep["kv"]) < 4 for keep in plan.layers.values()), "MHA heads are pruned in either mode"
    pruned = check_removal_equals_zeroing(model, plan)
    for layer, keep in zip(pruned.transformer.h, plan.layers.values()):
        assert layer.self_attention.num_heads == len(keep["kv"]) == layer.self_attention.dense.in_features // 16


def test_kept_heads_keep_their_own_alibi_slopes():
    """Keeping heads 1 and 3 must keep slopes 1 and 3: slopes rebuilt for 2 heads would change the logits."""
    model = tiny_bloom()
    plan = PruningPlan("heads", {0: {"kv": [1, 3]}, 1: {"kv": [0, 2, 3]}, 3: {"kv": [2]}})
    pruned = check_removal_equals_zeroing(model, plan)
    assert pruned.config.hywia_layers[0]["alibi_heads"] == [1, 3]
    # Left padding goes through Bloom's other ALiBi path (built from the attention mask).
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :5] = 0
    pruned = check_removal_equals_zeroing(model, plan, attention_mask=mask)
    check_generate_matches_forward(pruned)


def test_pruning_twice_composes_the_head_indices(tiny_tokenizer, tmp_path):
    model = apply_plan(tiny_bloom(), PruningPlan("heads", {0: {"kv": [1, 2, 3]}}))
    model = apply_plan(model, PruningPlan("heads", {0: {"kv": [0, 2]}}))
    assert model.config.hywia_layers[0]["alibi_heads"] == [1, 3]
    check_reload(model, tiny_tokenizer, tmp_path, "hywia_bloom")


def test_saved_pruned_model_reloads_to_identical_logits(tiny_tokenizer, tmp_path):
    model = apply_plan(tiny_bloom(), scored_plan(tiny_bloom(), 0.4))
    reloaded = check_reload(model, tiny_tokenizer, tmp_path, "hywia_bloom")
    assert [layer.self_attention.alibi_heads for layer in reloaded.transformer.h] == [
        w["alibi_heads"] for w in model.config.hywia_layers
    ]
    check_generate_matches_forward(reloaded)


def test_every_criterion_runs():
    check_every_criterion(tiny_bloom())


@pytest.mark.parametrize("heads", [1, 2, 5, 8, 12, 16, 40, 112])
def test_alibi_slopes_are_the_published_ones(heads):
    torch.testing.assert_close(alibi_slopes(heads), _get_alibi_slopes(heads, torch.device("cpu")))
    assert alibi_slopes(heads)[0].item() == pytest.approx(2 ** (-8 / 2 ** math.floor(math.log2(heads))))
