"""Phi-3: fused qkv_proj and gate_up_proj; groups own their rows inside the fused tensors, GQA by HF's h // (H/KV)."""

import gguf
import numpy as np
import pytest
import torch

import hywia  # noqa: F401  (registers the pruned classes)
from family_checks import check_generate_matches_forward, check_removal_equals_zeroing, tiny_family_model
from hywia.errors import InvalidRequestError, UnsupportedModelError
from hywia.io import save_model
from hywia.io.gguf_export import export_gguf
from hywia.models import adapter_for
from hywia.pruning import PruningPlan, apply_plan

HEADS, KV, D, MLP = 4, 2, 16, 96


def test_groups_own_their_rows_of_the_fused_projections():
    model = tiny_family_model("phi3")
    layer = adapter_for(model).layers()[0]
    head, mlp = adapter_for(model, "heads").group_specs(layer)
    qkv_rows = torch.cat([head.indices(torch.tensor([2]), s) for s in head.slices if "qkv" in s.param])
    assert (head.kind, head.count, head.kv_groups) == ("head", HEADS, KV)
    assert torch.equal(qkv_rows, torch.arange(2 * D, 3 * D))  # only its q rows: k and v are shared
    (kv,) = [s for s in adapter_for(model, "kv").group_specs(layer) if s.kind == "kv"]
    rows = torch.cat([kv.indices(torch.tensor([1]), s) for s in kv.slices if "qkv" in s.param])
    q_end, k_end = HEADS * D, (HEADS + KV) * D
    assert torch.equal(rows, torch.cat([torch.arange(2 * D, 4 * D),  # query heads 2, 3 read KV head 1
                                        torch.arange(q_end + D, q_end + 2 * D), torch.arange(k_end + D, k_end + 2 * D)]))
    channel = torch.cat([mlp.indices(torch.tensor([5]), s) for s in mlp.slices if "gate_up" in s.param])
    assert torch.equal(channel, torch.tensor([5, MLP + 5]))  # row j of the gate half and of the up half


def test_query_heads_go_the_same_number_per_kv_group():
    model = tiny_family_model("phi3")
    pruned = check_removal_equals_zeroing(model, PruningPlan("heads", {0: {"head": [1, 3]}, 2: {"head": [0, 3]}}))
    attn = pruned.model.layers[0].self_attn
    assert attn.qkv_proj.out_features == (2 + 2 * KV) * D and attn.num_key_value_groups == 1
    check_generate_matches_forward(pruned)
    with pytest.raises(InvalidRequestError, match="per KV group"):
        apply_plan(tiny_family_model("phi3"), PruningPlan("heads", {0: {"head": [0, 1]}}))


def test_whole_kv_groups_and_mlp_channels_go():
    model = tiny_family_model("phi3")
    plan = PruningPlan("kv", {1: {"kv": [1], "mlp": list(range(0, MLP, 2))}})
    pruned = check_removal_equals_zeroing(model, plan)
    assert pruned.config.hywia_layers[1] == {"num_attention_heads": 2, "num_key_value_heads": 1,
                                             "intermediate_size": MLP // 2}
    check_generate_matches_forward(pruned)


def test_gguf_splits_the_fused_projections(tiny_tokenizer, tmp_path):
    plan = PruningPlan("kv", {1: {"kv": [1], "mlp": list(range(0, MLP, 2))}})
    model = apply_plan(tiny_family_model("phi3"), plan)
    save_model(model, tiny_tokenizer, tmp_path / "model")
    result = export_gguf(str(tmp_path / "model"), tmp_path / "model.gguf", outtype="f32")
    assert result.arch == "deci"
    tensors = {t.name: t.data for t in gguf.GGUFReader(result.path).tensors}
    layer = model.model.layers[1]
    qkv, gate_up = layer.self_attn.qkv_proj.weight.detach(), layer.mlp.gate_up_proj.weight.detach()
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight"], qkv[3 * D:].numpy())  # q: 2 heads, k: 1, v: 1
    np.testing.assert_array_equal(tensors["blk.1.ffn_gate.weight"], gate_up[: MLP // 2].numpy())
    np.testing.assert_array_equal(tensors["blk.1.ffn_up.weight"], gate_up[MLP // 2:].numpy())


def test_gguf_refuses_partial_rotary_heads(tiny_tokenizer, tmp_path):
    """Phi-4-mini (a Phi3ForCausalLM) rotates 3/4 of each head: the llama block cannot say so."""
    model = tiny_family_model("phi3")
    model.config.rope_parameters = {**model.config.rope_parameters, "partial_rotary_factor": 0.75}
    save_model(apply_plan(model, PruningPlan("kv", {1: {"kv": [1]}})), tiny_tokenizer, tmp_path / "model")
    with pytest.raises(UnsupportedModelError, match="rotates 0.75 of each head"):
        export_gguf(str(tmp_path / "model"), tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()
