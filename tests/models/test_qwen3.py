"""Qwen3: LLaMA's groups with GQA; the per-head q_norm/k_norm (head_dim weights shared by all heads) stay whole."""

import gguf
import numpy as np
import torch

import hywia  # noqa: F401  (registers the pruned classes)
from family_checks import check_generate_matches_forward, check_removal_equals_zeroing, tiny_family_model
from hywia.io import save_model
from hywia.io.gguf_export import export_gguf
from hywia.models import adapter_for
from hywia.pruning import PruningPlan, allocate_uniform, apply_plan, select


def test_head_norms_stay_whole_when_heads_go():
    model = tiny_family_model("qwen3")
    norms = {name: p.detach().clone() for name, p in model.named_parameters() if "_norm" in name}
    pruned = check_removal_equals_zeroing(model, PruningPlan("heads", {0: {"head": [1, 2]}, 3: {"head": [0, 3]}}))
    assert {name: p for name, p in pruned.named_parameters() if "_norm" in name}.keys() == norms.keys()
    for name, p in pruned.named_parameters():
        if "_norm" in name:
            assert torch.equal(p, norms[name]), name
    assert pruned.model.layers[0].self_attn.num_key_value_groups == 1
    check_generate_matches_forward(pruned)


def test_same_widths_everywhere_export_as_qwen3(tiny_tokenizer, tmp_path):
    model = tiny_family_model("qwen3")
    adapter = adapter_for(model, "kv")
    keep = allocate_uniform(adapter, [0, 1, 2, 3], 0.3)
    scores = {(i, s.kind): torch.arange(s.count, dtype=torch.float) for i in range(4)
              for s in adapter.group_specs(adapter.layers()[i])}
    model = apply_plan(model, select(adapter, scores, keep))
    save_model(model, tiny_tokenizer, tmp_path / "model")
    result = export_gguf(str(tmp_path / "model"), tmp_path / "model.gguf", outtype="f32")
    assert result.arch == "qwen3"
    tensors = {t.name: t.data for t in gguf.GGUFReader(result.path).tensors}
    state = model.state_dict()
    np.testing.assert_array_equal(tensors["blk.2.attn_q_norm.weight"], state["model.layers.2.self_attn.q_norm.weight"])
    # qwen3 rotates halves, as transformers: q rows are written as they are
    np.testing.assert_array_equal(tensors["blk.2.attn_q.weight"], state["model.layers.2.self_attn.q_proj.weight"])
