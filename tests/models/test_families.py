"""Every registered family, LLaMA included, through every step a user takes, on a tiny random model: prune, zero-mask
equals removal, reload with and without hywia, LoRA tune + merge, eval, export. A new family gets all of it by
adding its tiny config to family_checks.tiny_family_configs (the first test fails until it does)."""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hywia
from conftest import TINY_TEXT
from family_checks import (
    VOCAB,
    check_removal_equals_zeroing,
    ids,
    logits,
    logits_without_hywia,
    scored_plan,
    tiny_family_configs,
    tiny_family_model,
)
from hywia.calibration import ActivationStore, capture_layer_inputs, replay_start
from hywia.cli import main
from hywia.io import load_model
from hywia.models import adapter_for, supported_architectures
from hywia.models.remote import DIR as REMOTE_DIR
from hywia.recovery.lora import load_adapter

GELU_TABLE_ATOL = 3e-3  # llama.cpp's CPU GELU (a float16 lookup table) on the tiny models' logits

CASES = list(tiny_family_configs())
ALPACA = [
    {"instruction": "Finish the sentence.", "input": "The quick brown fox", "output": "jumps over the lazy dog."},
    {"instruction": "What does pruning remove?", "input": "", "output": "Whole channels and attention heads."},
    {"instruction": "What decides what stays?", "input": "", "output": "The importance of each group."},
    {"instruction": "What gives the gradients?", "input": "", "output": "Calibration text gives the gradients."},
]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    (root / "text.txt").write_text("\n\n".join([TINY_TEXT] * 6))
    (root / "alpaca.jsonl").write_text("\n".join(json.dumps(record) for record in ALPACA) + "\n")
    return root


@pytest.fixture(scope="module")
def pruned(work, tiny_tokenizer):
    """case -> (folder, PruneResult): `hywia.prune` of 30% over layers 0-3 of the saved dense tiny model, built once."""
    results = {}

    def get(case: str, **options):
        key = (case, tuple(sorted(options.items())))
        if key not in results:
            dense = work / f"{case}-dense"
            if not dense.exists():
                tiny_family_model(case).save_pretrained(dense)
                tiny_tokenizer.save_pretrained(dense)
            # not named after the case: llama.cpp applies Phi-3's special-token rules (which look up "</s>", absent
            # from the tiny tokenizer) to any file whose general.name, the folder's name, contains "phi3"
            out = work / f"pruned-{len(results)}"
            result = hywia.prune(str(dense), ratio=0.3, layers="0:4", calib=work / "text.txt", calib_samples=4,
                                 seq_len=16, ppl_text=None, out=out, device="cpu", progress=False, **options)
            results[key] = out, result
        return results[key]

    return get


def test_every_registered_family_has_a_tiny_case():
    built = {type(tiny_family_model(case)).__name__ for case in CASES}
    registered = {name for name in supported_architectures() if not name.startswith("Hywia")}
    assert built == registered


@pytest.mark.parametrize("case", CASES)
def test_prune_reaches_the_ratio_within_a_point(case, pruned):
    folder, result = pruned(case)
    assert abs(result.report["ratio_achieved"] - 0.3) <= 0.01, result.report["ratio_achieved"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"].startswith("hywia_") and len(config["hywia_layers"]) == 4


@pytest.mark.parametrize("attention", ["heads", "kv", "none"])
@pytest.mark.parametrize("case", CASES)
def test_zero_mask_equals_physical_removal(case, attention):
    model = tiny_family_model(case)
    check_removal_equals_zeroing(model, scored_plan(model, 0.3, attention))


@pytest.mark.parametrize("case", CASES)
def test_reload_with_hywia_gives_identical_logits(case, pruned):
    folder, result = pruned(case)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert type(reloaded) is type(result.model)
    torch.testing.assert_close(logits(reloaded, ids()), logits(result.model, ids()), atol=0, rtol=0)
    loaded, _ = load_model(str(folder), device="cpu")
    assert type(loaded) is type(result.model)


def test_reload_without_hywia_through_the_folders_own_code(pruned, work):
    folders, models = [], []
    for case in CASES:
        folder, result = pruned(case)
        config = json.loads((folder / "config.json").read_text())
        module = adapter_for(result.model).remote_module
        assert config["auto_map"] == {"AutoConfig": f"{module}.{type(result.model.config).__name__}",
                                      "AutoModelForCausalLM": f"{module}.{type(result.model).__name__}"}
        assert (folder / f"{module}.py").read_text() == (REMOTE_DIR / f"{module}.py").read_text()
        folders.append(folder)
        models.append(result.model)
    lines, outputs = logits_without_hywia(folders, ids(), work)
    assert lines == [f"{type(m).__name__} {type(m.config).model_type}" for m in models]
    for case, model, output in zip(CASES, models, outputs):
        np.testing.assert_array_equal(output, logits(model, ids()).numpy(), err_msg=case)


@pytest.mark.parametrize("case", CASES)
def test_lora_tune_and_merge_with_adapters_sized_per_layer(case, pruned, work, tmp_path, capsys):
    folder, result = pruned(case)
    out = tmp_path / "tuned"
    assert main(["tune", "--model", str(folder), "--data", str(work / "alpaca.jsonl"), "--out", str(out),
                 "--steps", "2", "--batch-size", "2", "--lr", "1e-2", "--merge", "--ppl-text", "none"]) == 0, \
        capsys.readouterr().err
    adapter = adapter_for(result.model)
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    for index, layer in enumerate(adapter.layers()):
        prefix = f"base_model.model.{adapter.layer_name(index)}."
        for name, module in layer.named_modules():
            if name.rsplit(".", 1)[-1] not in adapter.lora_targets:
                continue
            a, b = weights[f"{prefix}{name}.lora_A.weight"], weights[f"{prefix}{name}.lora_B.weight"]
            assert a.shape == (8, module.in_features) and b.shape == (module.out_features, 8), (index, name)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert [p.shape for p in merged.parameters()] == [p.shape for p in result.model.parameters()]
    unmerged = load_adapter(AutoModelForCausalLM.from_pretrained(folder), out / "adapter")
    torch.testing.assert_close(logits(merged, ids()), logits(unmerged, ids()), atol=1e-5, rtol=0)
    assert (logits(merged, ids()) - logits(result.model, ids())).abs().max() > 1e-4, "tuning changed the model"


@pytest.mark.parametrize("case", CASES)
def test_eval_measures_perplexity(case, pruned, work, tmp_path):
    folder, _ = pruned(case)
    record = tmp_path / "eval.json"
    assert main(["eval", "--model", str(folder), "--ppl-text", str(work / "text.txt"), "--tasks", "none",
                 "--device", "cpu", "--ppl-tokens", "256", "--seq-len", "32", "--out", str(record)]) == 0
    (row,) = json.loads(record.read_text())["perplexity"].values()
    assert math.isfinite(row["ppl"]) and row["ppl"] > 1


@pytest.mark.parametrize("case", CASES)
def test_export_writes_a_gguf_or_says_how(case, pruned, tmp_path, capsys):
    folder, result = pruned(case)
    mapping = adapter_for(result.model).gguf_mapping()
    path = tmp_path / "model.gguf"
    capsys.readouterr()  # what pruning printed
    code = main(["export", "--model", str(folder), "--gguf", str(path), "--outtype", "f32"])
    err = capsys.readouterr().err.strip().splitlines()  # refused from the config, before any weight loads
    if mapping.refusal:
        assert code == 2 and err == [f"hywia: error: {mapping.refusal}"] and not path.exists()
        return
    if not mapping.llama_block:  # written natively only with the same widths in every layer: the line says how
        assert code == 2 and len(err) == 1 and "--allocation uniform --layers 0:4 --compensate none" in err[0], err
        folder, result = pruned(case, allocation="uniform", compensate="none")
        assert main(["export", "--model", str(folder), "--gguf", str(path), "--outtype", "f32"]) == 0
    else:
        assert code == 0, err
    check_gguf_layers(path, result.model)


def check_gguf_layers(path, model) -> None:
    """The file's architecture, per-layer head counts and MLP widths, and every layer's projection shapes."""
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    widths = model.config.hywia_layers
    mapping = adapter_for(model).gguf_mapping()
    uniform = len({(w["num_attention_heads"], w["num_key_value_heads"], w["intermediate_size"]) for w in widths}) == 1
    expected = ("llama" if uniform else "deci") if mapping.llama_block else mapping.native_arch
    assert arch == expected
    fields = {name.removeprefix(f"{arch}."): field.contents() for name, field in reader.fields.items()}
    per_layer = (lambda key: [w[key] for w in widths]) if arch == "deci" else (lambda key: widths[0][key])
    assert fields["attention.head_count"] == per_layer("num_attention_heads")
    assert fields["attention.head_count_kv"] == per_layer("num_key_value_heads")
    assert fields["feed_forward_length"] == per_layer("intermediate_size")
    assert fields["block_count"] == 4 and fields["embedding_length"] == 64
    tensors = {t.name: list(t.shape) for t in reader.tensors}
    for i, w in enumerate(widths):
        q, kv, mlp = w["num_attention_heads"] * 16, w["num_key_value_heads"] * 16, w["intermediate_size"]
        # GGUF lists dimensions innermost first: [in_features, out_features]
        assert {name: tensors[f"blk.{i}.{name}.weight"] for name in
                ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")} == {
            "attn_q": [64, q], "attn_k": [64, kv], "attn_v": [64, kv], "attn_output": [q, 64],
            "ffn_gate": [64, mlp], "ffn_up": [64, mlp], "ffn_down": [mlp, 64]}



@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_runs_the_export(case, pruned, tmp_path):
    """Where llama-cpp-python is installed (requirements-llamacpp.txt builds llama.cpp), llama.cpp's logits of each
    written f32 file equal transformers' (f32 KV cache, one forward over every position); skipped otherwise."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    folder, result = pruned(case)
    mapping = adapter_for(result.model).gguf_mapping()
    if mapping.refusal:
        pytest.skip("llama.cpp cannot express this family")
    if not mapping.llama_block:
        folder, result = pruned(case, allocation="uniform", compensate="none")
    path = tmp_path / "model.gguf"
    assert main(["export", "--model", str(folder), "--gguf", str(path), "--outtype", "f32"]) == 0
    tokens = ids(1, 48, seed=2)[0].tolist()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=1,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    llm.eval(tokens)
    scores = np.array(llm.scores[: len(tokens)])
    llm.close()
    # llama.cpp's CPU GELU reads a float16 table: tests/io/test_gguf_export.py checks Gemma-3's blocks without it
    gelu = getattr(result.model.config, "hidden_activation", None) == "gelu_pytorch_tanh"
    np.testing.assert_allclose(scores, logits(result.model, torch.tensor([tokens]))[0].numpy(), rtol=0,
                               atol=GELU_TABLE_ATOL if gelu else 1e-4)


@pytest.mark.parametrize("case", CASES)
def test_held_out_losses_of_an_uncut_model_are_its_own(case):
    """The fusion's held-out check hands the replayed output of the last pruned layer to the model's own forward
    (hywia.importance.refit): with every group kept, each window's loss is the dense model's."""
    from hywia.importance import ScoringContext
    from hywia.importance.refit import refit_held_out_losses
    from hywia.importance.statistics import lm_loss

    model = tiny_family_model(case)
    adapter = adapter_for(model)
    layers = [1, 2]  # layer 3 above the handed-over output runs as usual
    specs = {i: adapter.group_specs(adapter.layers()[i]) for i in layers}
    windows = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    ctx = ScoringContext(model, adapter, layers, specs, windows, {}, progress=False)
    uncut = {(i, spec.kind): list(range(spec.count)) for i in layers for spec in specs[i]}
    losses = refit_held_out_losses(ctx, {"uncut": uncut}, windows[:2], windows[2:], ridge=0.01)["uncut"]
    with torch.no_grad():
        dense = [float(lm_loss(model, windows[i:i + 1])) for i in (2, 3)]
    assert losses.tolist() == pytest.approx(dense, rel=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_replay_start_records_the_calls_of_the_full_forward(case):
    """A replay starts with the layers above `low` only recording their calls (hywia.calibration.replay_start): the
    calls, `low`'s inputs and the layers' output arity must equal those of a forward through every layer
    (per-layer-type masks included)."""
    model = tiny_family_model(case)
    layers = adapter_for(model).layers()
    batches = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    calls, hidden, arity = replay_start(model, layers, 1, len(layers) - 1, batches)
    store = ActivationStore(on_disk=False)
    full, full_arity = capture_layer_inputs(model, layers, 1, len(layers) - 1, batches, store, input_layers={1})
    assert calls.keys() == full.keys() and arity == full_arity
    for index in full:
        for replayed, reference in zip(calls[index], full[index], strict=True):
            torch.testing.assert_close((replayed.args, replayed.kwargs, replayed.positional),
                                       (reference.args, reference.kwargs, reference.positional), atol=0, rtol=0)
            torch.testing.assert_close(replayed.run(layers[index], hidden[0]),
                                       reference.run(layers[index], hidden[0]), atol=0, rtol=0)
    for sample in range(len(batches)):
        torch.testing.assert_close(hidden[sample], store.get(1, sample, torch.device("cpu")), atol=0, rtol=0)
    store.close()
