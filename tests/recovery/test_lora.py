"""LoRA recovery on a heterogeneous (per-layer width) tiny LLaMA, and the instruction data it trains on."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from hywia.io import load_model, save_model
from hywia.models import mark_pruned
from hywia.recovery.data import (
    IGNORE_INDEX,
    build_examples,
    iter_json_records,
    load_examples,
    normalize,
    read_conversations,
    read_sharegpt,
    tokenize_conversation,
)
from hywia.recovery.lora import load_adapter, merge, tune

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "The quick brown fox?"}, {"role": "assistant", "content": "jumps over the lazy dog."}],
    [{"role": "user", "content": "What stays?"}, {"role": "assistant", "content": "The heads that matter."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is removed?"},
        {"role": "assistant", "content": "Whole channels."},
        {"role": "user", "content": "And?"},
        {"role": "assistant", "content": "Attention heads."},
    ],
]


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight)
    return layer


def heterogeneous(model: nn.Module) -> nn.Module:
    """Shrink modules as pruning does (layer 1 keeps query heads 0 and 2, one per KV head; layer 2 keeps 40 of
    96 MLP channels), then turn the model into hywia's pruned class whose config records per-layer widths."""
    attn = model.model.layers[1].self_attn
    rows = torch.cat([torch.arange(0, 16), torch.arange(32, 48)])
    attn.q_proj = _linear(attn.q_proj.weight.data[rows])
    attn.o_proj = _linear(attn.o_proj.weight.data[:, rows])
    attn.num_key_value_groups = 1
    mlp = model.model.layers[2].mlp
    mlp.gate_proj = _linear(mlp.gate_proj.weight.data[:40])
    mlp.up_proj = _linear(mlp.up_proj.weight.data[:40])
    mlp.down_proj = _linear(mlp.down_proj.weight.data[:, :40])
    mark_pruned(model)
    return model


@pytest.fixture
def pruned_model(tiny_model_factory):
    return lambda: heterogeneous(tiny_model_factory())


@pytest.fixture
def examples(tiny_tokenizer):
    examples = build_examples(tiny_tokenizer, CONVERSATIONS, cutoff_len=256)
    assert len(examples) == len(CONVERSATIONS)
    return examples


def test_heterogeneous_model_runs(pruned_model):
    model = pruned_model()
    assert model.model.layers[1].self_attn.q_proj.out_features == 32
    assert model.model.layers[2].mlp.down_proj.in_features == 40
    logits = model(torch.randint(0, 300, (2, 12))).logits
    assert logits.shape == (2, 12, 300) and torch.isfinite(logits).all()
    assert model.config.hywia_layers[1]["num_attention_heads"] == 2
    assert model.config.hywia_layers[2]["intermediate_size"] == 40


def test_lora_training_lowers_loss(pruned_model, tiny_tokenizer, examples, tmp_path):
    result = tune(pruned_model(), tiny_tokenizer, examples, tmp_path, steps=30, lr=1e-2, batch_size=3, save_steps=100)
    losses = [entry["loss"] for entry in result["loss_history"]]
    assert result["steps"] == 30 and len(losses) == 30 and result["resumed_from"] == 0
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert result["final_loss"] == losses[-1]
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    # LoRA pairs follow each module's own width.
    assert adapter["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (32, 8)
    assert adapter["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (8, 32)
    assert adapter["base_model.model.model.layers.2.mlp.down_proj.lora_A.weight"].shape == (8, 40)
    assert adapter["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].shape == (96, 8)


def test_merge_preserves_logits_and_reloads(pruned_model, tiny_tokenizer, examples, tmp_path):
    result = tune(pruned_model(), tiny_tokenizer, examples, tmp_path, steps=4, lr=1e-2, save_steps=100)
    peft_model = result["model"]
    base = peft_model.get_base_model()
    assert not peft_model.training and not base.is_activation_checkpointing and base.config.use_cache
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        before = peft_model(ids).logits
        reattached = load_adapter(pruned_model(), tmp_path / "adapter")(ids).logits
        merged = merge(peft_model)
        after = merged(ids).logits
    assert type(merged).__name__ == "HywiaLlamaForCausalLM"
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert merged.model.layers[1].self_attn.q_proj.weight.shape == (32, 64)
    assert all(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(reattached, before, atol=1e-5, rtol=0)
    # The untrained base differs: the adapter really changed the model.
    with torch.no_grad():
        assert (pruned_model()(ids).logits - after).abs().max() > 1e-3

    save_model(merged, tiny_tokenizer, tmp_path / "merged")
    reloaded, _ = load_model(str(tmp_path / "merged"), device="cpu")
    assert reloaded.model.layers[2].mlp.down_proj.in_features == 40
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, after, atol=1e-5, rtol=0)


def test_epochs_and_argument_checks(pruned_model, tiny_tokenizer, examples, tmp_path):
    model = pruned_model()
    result = tune(model, tiny_tokenizer, examples, tmp_path, epochs=2, batch_size=2, gradient_checkpointing=False)
    assert result["steps"] == 4  # 3 examples in batches of 2: two steps per epoch
    with pytest.raises(ValueError, match="either steps or epochs"):
        tune(pruned_model(), tiny_tokenizer, examples, tmp_path / "x", steps=2, epochs=1)
    with pytest.raises(ValueError, match="already carries LoRA"):
        tune(model, tiny_tokenizer, examples, tmp_path / "y", steps=1)  # LoRA was injected in place


def test_resume_continues_from_last_checkpoint(pruned_model, tiny_tokenizer, examples, tmp_path):
    first = tune(pruned_model(), tiny_tokenizer, examples, tmp_path, steps=4, lr=1e-2, batch_size=2, save_steps=2)
    assert first["steps"] == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    with pytest.raises(ValueError, match="resume=True"):
        tune(pruned_model(), tiny_tokenizer, examples, tmp_path, steps=6)

    second = tune(
        pruned_model(), tiny_tokenizer, examples, tmp_path, steps=7, lr=1e-2, batch_size=2, save_steps=2, resume=True
    )
    assert second["resumed_from"] == 4 and second["steps"] == 7
    steps = [entry["step"] for entry in second["loss_history"]]
    assert steps == list(range(1, 8))
    # Steps 1-4 come back from the checkpoint's log, unchanged; only 5-7 were trained now.
    assert second["loss_history"][:4] == first["loss_history"]
    assert (tmp_path / "checkpoints" / "checkpoint-7").is_dir()


def test_resumed_run_matches_uninterrupted_run(pruned_model, tiny_tokenizer, examples, tmp_path):
    """Optimizer, scheduler, RNG and data order all come back: an interrupted run ends where a whole one does."""
    settings = dict(steps=7, lr=1e-2, batch_size=2, save_steps=4, save_total_limit=None)
    whole = tune(pruned_model(), tiny_tokenizer, examples, tmp_path, **settings)
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-7")  # as if killed after step 4's checkpoint
    resumed = tune(pruned_model(), tiny_tokenizer, examples, tmp_path, resume=True, **settings)
    assert resumed["resumed_from"] == 4
    assert [e["step"] for e in resumed["loss_history"]] == list(range(1, 8))
    assert [e["loss"] for e in resumed["loss_history"]] == pytest.approx([e["loss"] for e in whole["loss_history"]])


# ---------------------------------------------------------------- data


def test_alpaca_template_labels_only_responses(tiny_tokenizer):
    assert not tiny_tokenizer.chat_template
    example = tokenize_conversation(tiny_tokenizer, CONVERSATIONS[2], cutoff_len=512)
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels) == len(example["attention_mask"])
    assert ids[0] == tiny_tokenizer.bos_token_id
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in trained)
    spans = tiny_tokenizer.decode([ids[i] for i in trained])
    assert spans == "Whole channels.<|endoftext|>Attention heads.<|endoftext|>"
    prompt = tiny_tokenizer.decode([ids[i] for i in range(len(ids)) if labels[i] == IGNORE_INDEX])
    assert "Be brief." in prompt and "### Instruction:\nAnd?" in prompt and "Whole" not in prompt


def test_chat_template_labels_only_responses(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    example = tokenize_conversation(tokenizer, CONVERSATIONS[2], cutoff_len=512)
    ids, labels = example["input_ids"], example["labels"]
    whole = tokenizer.apply_chat_template(CONVERSATIONS[2], tokenize=False)
    assert tokenizer.decode(ids) == whole
    trained = tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert trained == "Whole channels.<|im_end|>\nAttention heads.<|im_end|>\n"


def test_cutoff_truncates_and_drops_examples_without_responses(tiny_tokenizer):
    full = tokenize_conversation(tiny_tokenizer, CONVERSATIONS[0], cutoff_len=512)
    prompt_len = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    cut = tokenize_conversation(tiny_tokenizer, CONVERSATIONS[0], cutoff_len=prompt_len + 2)
    assert len(cut["input_ids"]) == prompt_len + 2 and cut["labels"][-2:] == full["labels"][prompt_len : prompt_len + 2]
    assert tokenize_conversation(tiny_tokenizer, CONVERSATIONS[0], cutoff_len=prompt_len) is None
    assert len(build_examples(tiny_tokenizer, CONVERSATIONS, cutoff_len=prompt_len + 1)) >= 1


def test_normalize_shapes_conversations():
    messages = [
        {"role": "assistant", "content": "continuation of a split chat"},
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "dangling"},
    ]
    assert normalize(messages) == [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}]
    assert normalize([{"role": "user", "content": "only a prompt"}]) == []


def _sharegpt_record(index: int) -> dict:
    return {
        "id": f"r{index}",
        "conversations": [{"from": "human", "value": f"question {index}"}, {"from": "gpt", "value": f"answer {index}"}],
    }


def test_sharegpt_truncated_file_keeps_complete_records(tmp_path):
    text = json.dumps([_sharegpt_record(i) for i in range(5)], indent=2)
    cut = text[: text.index('"answer 4"') + 5]  # inside the last record
    path = tmp_path / "sharegpt.json"
    path.write_text(cut)
    conversations = read_sharegpt(path)
    assert [c[1]["content"] for c in conversations] == [f"answer {i}" for i in range(4)]
    assert read_sharegpt(path, max_records=2)[1][0] == {"role": "user", "content": "question 1"}
    with pytest.raises(ValueError, match="invalid JSON"):
        list(iter_json_records(path))  # a user's file must not be cut silently
    path.write_text(text[: text.rindex("}") + 1])  # cut between records: the list is just not closed
    assert len(read_sharegpt(path)) == 5


def test_packaged_sharegpt_first_records():
    conversations = read_sharegpt(max_records=50)
    assert len(conversations) == 50
    for messages in conversations:
        assert messages[-1]["role"] == "assistant"
        assert {m["role"] for m in messages} <= {"system", "user", "assistant"}


def test_alpaca_json_and_jsonl(tmp_path, tiny_tokenizer):
    records = [
        {"instruction": "Name the animal.", "input": "The quick brown fox", "output": "A fox."},
        {"instruction": "Say hi.", "input": "", "output": "Hi."},
    ]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    expected = [
        [
            {"role": "user", "content": "Name the animal.\n\nThe quick brown fox"},
            {"role": "assistant", "content": "A fox."},
        ],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}],
    ]
    assert read_conversations(tmp_path / "a.json") == expected
    assert read_conversations(tmp_path / "a.jsonl") == expected
    assert len(load_examples(tiny_tokenizer, tmp_path / "a.jsonl", cutoff_len=512)) == 2


def test_chat_jsonl_messages_and_conversations(tmp_path):
    lines = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    conversations = read_conversations(path)
    assert conversations[0][1] == {"role": "assistant", "content": "hello"}
    assert conversations[1] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_data_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="not found"):
        read_conversations(tmp_path / "missing.json")
    (tmp_path / "empty.jsonl").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        read_conversations(tmp_path / "empty.jsonl")
    (tmp_path / "odd.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}))
    with pytest.raises(ValueError, match="none of the known fields"):
        read_conversations(tmp_path / "odd.jsonl")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="no records"):
        read_conversations(tmp_path / "list.json")
