"""Shared fixtures: tiny random models built from configs, a tiny local tokenizer, an isolated environment."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Set before torch/transformers are imported anywhere in the test session; the folders made here are removed when
# the process exits, however the session ends (a usage error never reaches pytest_sessionfinish).
SESSION_FOLDERS = [tempfile.mkdtemp(prefix="hywia-hf-home-")]
atexit.register(lambda: [shutil.rmtree(folder, ignore_errors=True) for folder in SESSION_FOLDERS])
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HOME"] = SESSION_FOLDERS[0]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Slow tests convert the embedded GGUF once per session unless the developer points HYWIA_CACHE at a warm cache.
if "HYWIA_CACHE" not in os.environ:
    SESSION_FOLDERS.append(tempfile.mkdtemp(prefix="hywia-cache-"))
    os.environ["HYWIA_CACHE"] = SESSION_FOLDERS[-1]

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. A pruned model keeps the heads that matter. "
    "Structured pruning removes whole channels and attention heads from every decoder layer. "
    "Calibration text gives the gradients; the importance of each group decides what stays. "
) * 4


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences: local, fast, with bos/eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([TINY_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<s>", pad_token="<pad>"
    )


def tiny_config(family: str = "llama", *, heads: int = 4, kv_heads: int = 2, layers: int = 4, vocab: int = 300,
                mlp: int = 96):
    """A small config of a supported family (hidden 64, head_dim 64 / heads, MLP `mlp` channels)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    config_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    return config_cls(**common)


def build_tiny_model(family: str = "llama", seed: int = 0, **kwargs):
    """A random model of the family in eval mode, weights scaled up so that pruning visibly changes logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kwargs), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
            elif param.dim() == 2:
                param.normal_(0, 0.08)
    return model.eval()


@pytest.fixture
def tiny_model_factory():
    return build_tiny_model


def save_tiny_folder(folder, tokenizer, family: str = "llama"):
    """A tiny random model of the family saved with its tokenizer, as a user's model folder."""
    build_tiny_model(family).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_folder(tiny_tokenizer, tmp_path):
    """A tiny llama (4 layers, 256 positions, MLP width 96) saved with its tokenizer in tmp_path/tiny."""
    return save_tiny_folder(tmp_path / "tiny", tiny_tokenizer)
