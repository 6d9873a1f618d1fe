"""Baichuan-7B (RoPE) and Baichuan-13B (ALiBi): hywia's own modeling code, original checkpoints, pruning."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

import hywia
from family_checks import (
    check_every_criterion,
    check_generate_matches_forward,
    check_ratio_zero_changes_nothing,
    check_reload,
    check_removal_equals_zeroing,
    ids,
    logits,
    randomise,
    scored_plan,
)
from hywia.io import load_model
from hywia.models import adapter_for
from hywia.models.remote.hywia_baichuan import BaichuanConfig, BaichuanForCausalLM
from hywia.pruning import PruningPlan, apply_plan
from hywia.pruning.compensate import compensate

VARIANTS = {
    "rope": dict(max_position_embeddings=256),  # Baichuan-7B's config names max_position_embeddings
    "alibi": dict(model_max_length=256),  # Baichuan-13B's only model_max_length
}
HIDDEN, HEADS, HEAD_DIM, MLP, LAYERS = 64, 4, 16, 96, 4


def tiny_config(variant: str) -> BaichuanConfig:
    return BaichuanConfig(vocab_size=300, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                          num_attention_heads=HEADS, **VARIANTS[variant])


def tiny_baichuan(variant: str, seed: int = 0) -> BaichuanForCausalLM:
    torch.manual_seed(seed)
    return randomise(AutoModelForCausalLM.from_config(tiny_config(variant), dtype=torch.float32), seed)


def original_checkpoint(folder, variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny folder laid out like the published checkpoints: their config keys, W_pack safetensors."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.08):
        return torch.randn(*shape, generator=generator) * std

    state = {"model.embed_tokens.weight": rand(300, HIDDEN), "model.norm.weight": 1 + rand(HIDDEN, std=0.1),
             "lm_head.weight": rand(300, HIDDEN)}
    for i in range(LAYERS):
        prefix = f"model.layers.{i}."
        state |= {
            prefix + "self_attn.W_pack.weight": rand(3 * HIDDEN, HIDDEN),
            prefix + "self_attn.o_proj.weight": rand(HIDDEN, HIDDEN),
            prefix + "mlp.gate_proj.weight": rand(MLP, HIDDEN),
            prefix + "mlp.up_proj.weight": rand(MLP, HIDDEN),
            prefix + "mlp.down_proj.weight": rand(HIDDEN, MLP),
            prefix + "input_layernorm.weight": 1 + rand(HIDDEN, std=0.1),
            prefix + "post_attention_layernorm.weight": 1 + rand(HIDDEN, std=0.1),
        }
    config = {
        "architectures": ["BaiChuanForCausalLM" if variant == "rope" else "BaichuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu", "hidden_size": HIDDEN,
        "initializer_range": 0.02, "intermediate_size": MLP, "model_type": "baichuan",
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True, "vocab_size": 300,
        **VARIANTS[variant],
    }
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return state


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_original_checkpoint_folder_loads(tmp_path, tiny_tokenizer, variant):
    state = original_checkpoint(tmp_path / "ckpt", variant)
    tiny_tokenizer.save_pretrained(tmp_path / "ckpt")
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", output_loading_info=True)
    assert type(model) is BaichuanForCausalLM and model.config.position_embedding == variant
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, tensor in state.items():
        assert torch.equal(model.get_parameter(name), tensor), name
    loaded, tokenizer = load_model(str(tmp_path / "ckpt"), device="cpu")
    assert type(loaded) is BaichuanForCausalLM and tokenizer.eos_token == tiny_tokenizer.eos_token


def test_rope_variant_is_llama_with_a_packed_qkv():
    model = tiny_baichuan("rope")
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=HIDDEN, intermediate_size=MLP,
                                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                         max_position_embeddings=256, rms_norm_eps=1e-6)).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        if "W_pack" in name:
            for part, proj in zip(tensor.chunk(3), ("q_proj", "k_proj", "v_proj")):
                state[name.replace("W_pack", proj)] = part
        else:
            state[name] = tensor
    llama.load_state_dict(state)
    torch.testing.assert_close(logits(model, ids()), logits(llama, ids()), atol=1e-5, rtol=0)


def test_alibi_variant_matches_a_reference_forward():
    """Baichuan-13B's attention: q.k/sqrt(d) + slope_h * key position, causal, over [q; k; v] = W_pack x."""
    model = tiny_baichuan("alibi")
    tokens = ids()
    batch, length = tokens.shape
    slopes = _get_alibi_slopes(HEADS, torch.device("cpu"))
    bias = slopes[:, None, None] * torch.arange(length)[None, None, :]
    causal = torch.full((length, length), float("-inf")).triu(1)
    with torch.no_grad():
        hidden = model.model.embed_tokens(tokens)
        for layer in model.model.layers:
            x = layer.input_layernorm(hidden)
            q, k, v = (t.view(batch, length, HEADS, HEAD_DIM).transpose(1, 2)
                       for t in (x @ layer.self_attn.W_pack.weight.T).chunk(3, dim=-1))
            probs = (q @ k.transpose(-1, -2) / HEAD_DIM**0.5 + bias + causal).softmax(-1)
            hidden = hidden + layer.self_attn.o_proj((probs @ v).transpose(1, 2).reshape(batch, length, HIDDEN))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        reference = model.lm_head(model.model.norm(hidden))
    torch.testing.assert_close(logits(model, tokens), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_head_groups_span_q_k_and_v_of_w_pack(variant):
    model = tiny_baichuan(variant)
    adapter = adapter_for(model)
    head, mlp = adapter.group_specs(adapter.layers()[0])
    assert (head.kind, head.count, head.gate_module, head.gate_block) == ("kv", HEADS, "self_attn.o_proj", HEAD_DIM)
    assert (mlp.kind, mlp.count, mlp.gate_module) == ("mlp", MLP, "mlp.down_proj")
    rows = torch.cat([head.indices(torch.tensor([1]), s) for s in head.slices[:3]])
    expected = torch.cat([torch.arange(16, 32), torch.arange(80, 96), torch.arange(144, 160)])
    assert torch.equal(rows, expected)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ratio_zero_changes_nothing(variant):
    check_ratio_zero_changes_nothing(tiny_baichuan(variant))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("attention", ["heads", "kv"])
def test_physical_removal_equals_zeroing(variant, attention):
    model = tiny_baichuan(variant)
    plan = scored_plan(model, 0.4, attention)
    assert all(len(keep["kv"]) < HEADS for keep in plan.layers.values()), "MHA heads are pruned in either mode"
    pruned = check_removal_equals_zeroing(model, plan)
    check_generate_matches_forward(pruned)


def test_kept_heads_keep_their_own_alibi_slopes():
    model = tiny_baichuan("alibi")
    plan = PruningPlan("heads", {0: {"kv": [1, 3]}, 2: {"kv": [0, 2, 3]}, 3: {"kv": [2]}})
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :5] = 0
    pruned = check_removal_equals_zeroing(model, plan, attention_mask=mask)
    assert [w.get("alibi_heads") for w in pruned.config.hywia_layers] == [[1, 3], [0, 1, 2, 3], [0, 2, 3], [2]]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_pruned_model_reloads_to_identical_logits(tiny_tokenizer, tmp_path, variant):
    model = apply_plan(tiny_baichuan(variant), scored_plan(tiny_baichuan(variant), 0.4))
    reloaded = check_reload(model, tiny_tokenizer, tmp_path, "hywia_baichuan")
    assert reloaded.config.position_embedding == variant
    check_generate_matches_forward(reloaded)


def test_compensation_biases_survive_reload(tiny_tokenizer, tmp_path):
    model = tiny_baichuan("alibi")
    plan = scored_plan(model, 0.4)
    adapter = adapter_for(model)
    compensate(model, adapter, plan, ids(4, 24, seed=0), "bias")
    apply_plan(model, plan)
    assert model.config.hywia_layers[0]["added_biases"] == ["self_attn.o_proj", "mlp.down_proj"]
    check_reload(model, tiny_tokenizer, tmp_path, "hywia_baichuan")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_criterion_runs(variant):
    check_every_criterion(tiny_baichuan(variant))


def test_prune_an_original_checkpoint_end_to_end(tmp_path, tiny_tokenizer):
    original_checkpoint(tmp_path / "ckpt", "alibi")
    tiny_tokenizer.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "calib.txt").write_text("\n\n".join(
        f"Passage {i}: structured pruning removes whole heads and channels from every decoder layer." for i in range(8)
    ))
    result = hywia.prune(str(tmp_path / "ckpt"), ratio=0.3, allocation="uniform", calib=tmp_path / "calib.txt", calib_samples=4,
                         seq_len=16, layers="1:3", ppl_text=None, out=tmp_path / "out", progress=False)
    assert abs(result.report["ratio_achieved"] - 0.3) < 0.05
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(reloaded, ids()), logits(result.model, ids()), atol=0, rtol=0)


def test_baichuan2_is_refused_not_misread(tmp_path):
    with pytest.raises(ValueError, match="Baichuan 2"):
        BaichuanConfig(vocab_size=300, hidden_size=HIDDEN, num_attention_heads=HEADS, z_loss_weight=0)
    original_checkpoint(tmp_path / "ckpt", "rope")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config | {"z_loss_weight": 0}))
    with pytest.raises(ValueError, match="Baichuan 2"):
        AutoConfig.from_pretrained(tmp_path / "ckpt")
