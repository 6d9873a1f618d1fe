import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hywia  # noqa: F401  (registers the pruned classes)
from hywia.errors import InvalidRequestError, ModelLoadError
from hywia.io import atomic_dir, load_model, save_model
from hywia.models import adapter_for
from hywia.pruning import allocate_uniform, apply_plan, select


def _pruned(model, ratio=0.4, attention="heads"):
    adapter = adapter_for(model, attention)
    layers = [0, 1, 2, 3]
    keep = allocate_uniform(adapter, layers, ratio)
    generator = torch.Generator().manual_seed(0)
    scores = {(i, s.kind): torch.rand(s.count, generator=generator)
              for i in layers for s in adapter.group_specs(adapter.layers()[i])}
    return apply_plan(model, select(adapter, scores, keep))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("attention", ["heads", "kv", "none"])
def test_saved_pruned_model_reloads_to_identical_logits(tiny_model_factory, tiny_tokenizer, tmp_path, family,
                                                        attention):
    model = _pruned(tiny_model_factory(family, heads=4, kv_heads=2), attention=attention)
    save_model(model, tiny_tokenizer, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == f"hywia_{family}" and len(config["hywia_layers"]) == 4
    assert not list((tmp_path / "out").glob("*.bin")), "no pickle files"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    loaded, tokenizer = load_model(str(tmp_path / "out"), device="cpu")
    assert type(loaded).__name__ == type(model).__name__ and tokenizer.eos_token == tiny_tokenizer.eos_token


def test_reloaded_pruned_model_can_be_pruned_again(tiny_model_factory, tiny_tokenizer, tmp_path):
    save_model(_pruned(tiny_model_factory("llama")), tiny_tokenizer, tmp_path / "a")
    model, _ = load_model(str(tmp_path / "a"))
    twice = _pruned(model, ratio=0.2)
    save_model(twice, tiny_tokenizer, tmp_path / "b")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert again.config.hywia_layers == twice.config.hywia_layers


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "partial.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(InvalidRequestError, match="--force"):
        with atomic_dir(tmp_path / "out"):
            pass
    with atomic_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "new.txt").write_text("y")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]


def test_missing_or_corrupt_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "absent"))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(str(tmp_path / "corrupt"))
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text("{}")
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(tmp_path / "pickle"))
