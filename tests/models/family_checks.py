"""The core's correctness checks, run on any family: each tests/models/test_<family>.py calls them on its tiny
models. Not collected itself (no test_ prefix)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
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


# --- every registered family, tiny ---------------------------------------------------------------------------------

def tiny_family_configs() -> dict[str, object]:
    """One tiny config per case (hidden 64, 4 layers, 4 heads of 16, vocab 300): every registered family, LLaMA in
    MHA and GQA form, Baichuan in its RoPE (7B) and ALiBi (13B) variants. A new family adds its case here."""
    from transformers import (
        BloomConfig,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    from hywia.models.remote.hywia_baichuan import BaichuanConfig

    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                 max_position_embeddings=256, tie_word_embeddings=False)
    gqa = dict(shape, num_key_value_heads=2)
    return {
        "llama-mha": LlamaConfig(**shape, num_key_value_heads=4),
        "llama-gqa": LlamaConfig(**gqa),
        "mistral": MistralConfig(**gqa),
        "qwen2": Qwen2Config(**gqa),
        "qwen3": Qwen3Config(**gqa, head_dim=16),
        "gemma3": Gemma3TextConfig(**gqa, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                                   layer_types=["sliding_attention", "full_attention"] * 2),
        "phi3": Phi3Config(**gqa, pad_token_id=0),  # its default pad id 32000 is outside the vocabulary
        "bloom": BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=4, n_head=4),
        "baichuan-7b": BaichuanConfig(**{k: v for k, v in shape.items() if k != "max_position_embeddings"},
                                      max_position_embeddings=256),
        "baichuan-13b": BaichuanConfig(**{k: v for k, v in shape.items() if k != "max_position_embeddings"},
                                       model_max_length=256),
    }


def tiny_family_model(case: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomise(AutoModelForCausalLM.from_config(tiny_family_configs()[case], dtype=torch.float32), seed)


# Runs with `python -I` (no cwd, no PYTHONPATH) and a meta-path hook that refuses hywia, whose editable install
# would otherwise still be importable from site-packages. Arguments: ids.npy, then folder/logits.npy pairs.
WITHOUT_HYWIA = r"""
import sys

class NoHywia:
    def find_spec(self, name, path=None, target=None):
        if name == "hywia" or name.startswith("hywia."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, NoHywia())
try:
    import hywia
except ModuleNotFoundError:
    pass
else:
    sys.exit("hywia is importable")

import numpy as np
import torch
from transformers import AutoModelForCausalLM

ids = torch.from_numpy(np.load(sys.argv[1]))
for folder, logits_file in zip(sys.argv[2::2], sys.argv[3::2]):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    print(type(model).__name__, model.config.model_type)
    with torch.no_grad():
        np.save(logits_file, model(input_ids=ids).logits.numpy())
assert not any(name == "hywia" or name.startswith("hywia.") for name in sys.modules)
"""


def logits_without_hywia(folders: list, token_ids: torch.Tensor, work) -> tuple[list[str], list[np.ndarray]]:
    """Load each folder in a fresh interpreter where hywia cannot be imported (its own modeling code, through
    trust_remote_code) and return the printed `class model_type` lines and the logits on `token_ids`."""
    np.save(work / "ids.npy", token_ids.numpy())
    args = []
    for i, folder in enumerate(folders):
        args += [str(folder), str(work / f"logits-{i}.npy")]
    child = subprocess.run([sys.executable, "-I", "-c", WITHOUT_HYWIA, str(work / "ids.npy"), *args],
                           capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, child.stderr[-3000:]
    return child.stdout.splitlines(), [np.load(work / f"logits-{i}.npy") for i in range(len(folders))]
