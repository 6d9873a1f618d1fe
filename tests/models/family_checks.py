"""The core's correctness checks, run on any family: each tests/models/test_<family>.py calls them on its tiny
models. Not collected itself (no test_ prefix)."""

from __future__ import annotations

import copy
import json

import torch
from transformers import AutoModelForCausalLM

from hywia.importance import ScoringContext, available_criteria, collect_statistics, get_criterion
from hywia.io import load_model, save_model
from hywia.models import adapter_for
from hywia.pruning import PruningPlan, allocate_uniform, apply_plan, mask_plan, select

VOCAB = 300


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights scaled up (as conftest's tiny models) so that pruning visibly changes the logits; eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            std = 0.08 if param.dim() == 2 else 0.1
            if param.dim() == 2 or name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.eval()


def logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def ids(batch: int = 2, length: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def scoring_context(model, ratio: float, attention: str = "heads") -> ScoringContext:
    """Real calibration statistics over every layer of a tiny model, uniform allocation at `ratio`."""
    adapter = adapter_for(model, attention)
    layers = list(range(len(adapter.layers())))
    keep = allocate_uniform(adapter, layers, ratio)
    batches = ids(4, 24, seed=0)
    stats = collect_statistics(model, adapter, layers, batches, progress=False)
    specs = {i: adapter.group_specs(adapter.layers()[i]) for i in layers}
    return ScoringContext(model, adapter, layers, specs, batches, keep, 0, stats, progress=False)


def scored_plan(model, ratio: float, attention: str = "heads", criterion: str = "taylor-element1") -> PruningPlan:
    ctx = scoring_context(model, ratio, attention)
    return select(ctx.adapter, get_criterion(criterion).score(ctx), ctx.keep)


def check_ratio_zero_changes_nothing(model) -> None:
    plan = scored_plan(model, 0.0)
    adapter = adapter_for(model)
    for index, keep in plan.layers.items():
        for spec in adapter.group_specs(adapter.layers()[index]):
            assert len(keep[spec.kind]) == spec.count
    pruned = apply_plan(copy.deepcopy(model), plan)
    torch.testing.assert_close(logits(pruned, ids()), logits(model, ids()), atol=0, rtol=0)


def check_removal_equals_zeroing(model, plan: PruningPlan, **forward_kwargs) -> torch.nn.Module:
    """The plan applied physically gives the logits of the plan applied as a zero-mask; returns the pruned model."""
    dense = logits(model, ids(), **forward_kwargs)
    masked = logits(mask_plan(copy.deepcopy(model), plan), ids(), **forward_kwargs)
    pruned_model = apply_plan(copy.deepcopy(model), plan)
    assert (masked - dense).abs().max() > 1e-3, "the plan must actually change the model"
    torch.testing.assert_close(logits(pruned_model, ids(), **forward_kwargs), masked, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in pruned_model.parameters()) < sum(p.numel() for p in model.parameters())
    return pruned_model


def check_generate_matches_forward(model) -> None:
    """Decoding with the KV cache agrees with a full forward over the generated sequence."""
    prompt = ids(1, 8)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    full = logits(model, out[:, :-1])[:, -1].argmax(-1)
    assert out.shape[1] == 14 and full.item() == out[0, -1].item()


def check_reload(model, tokenizer, tmp_path, model_type: str) -> AutoModelForCausalLM:
    """Saved pruned model: safetensors + per-layer widths, reloads with the Auto classes to identical logits."""
    save_model(model, tokenizer, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == model_type and len(config["hywia_layers"]) == len(adapter_for(model).layers())
    assert not list((tmp_path / "out").glob("*.bin")), "no pickle files"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(reloaded, ids()), logits(model, ids()), atol=0, rtol=0)
    loaded, _ = load_model(str(tmp_path / "out"), device="cpu")
    assert type(loaded).__name__ == type(model).__name__
    return reloaded


def check_every_criterion(model) -> None:
    """Every registered criterion scores every group finitely, and its plan cuts to a working model."""
    ctx = scoring_context(model, 0.3)
    for name in available_criteria():
        scores = get_criterion(name).score(ctx)
        for layer, spec in ctx.items():
            score = scores[(layer, spec.kind)]
            assert score.shape == (spec.count,) and torch.isfinite(score).all(), name
        pruned = apply_plan(copy.deepcopy(model), select(ctx.adapter, scores, ctx.keep))
        assert torch.isfinite(logits(pruned, ids())).all(), name
