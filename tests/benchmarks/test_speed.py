import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.harness.speed import (
    Decoder,
    SpeedSettings,
    Variant,
    benchmark_shape,
    ceiling,
    chunk_sizes,
    compiled_twin,
    macs_per_token,
    measure,
    plan_origin,
    plan_variant,
    plan_variants,
    pruned_copy,
    render_markdown,
    static_cache,
)
from hywia.errors import InvalidRequestError
from hywia.models import adapter_for

# tiny llama of conftest: hidden 64, head_dim 16, 4 query / 2 KV heads, MLP 96, vocab 300
HIDDEN, HEAD_DIM, KV_HEADS, VOCAB = 64, 16, 2, 300


def _layer_macs(heads: int, mlp: int) -> int:
    q_and_o = 2 * HIDDEN * heads * HEAD_DIM
    k_and_v = 2 * HIDDEN * KV_HEADS * HEAD_DIM
    return q_and_o + k_and_v + 3 * HIDDEN * mlp


def test_macs_per_token_is_the_hand_count(tiny_model_factory):
    model = tiny_model_factory("llama", layers=4)
    assert macs_per_token(model) == 4 * _layer_macs(4, 96) + VOCAB * HIDDEN == 142_080


def test_tied_lm_head_counts_once():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert macs_per_token(model) == _layer_macs(4, 96) + VOCAB * HIDDEN


def test_ceiling_of_a_pruned_tiny_model(tiny_model_factory):
    model = tiny_model_factory("llama", layers=4)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        before = model(ids).logits
        pruned = pruned_copy(model, Variant(0.5))
        assert torch.equal(model(ids).logits, before)
    widths = [adapter_for(pruned).widths(layer) for layer in adapter_for(pruned).layers()]
    assert all(w["num_attention_heads"] < 4 or w["intermediate_size"] < 96 for w in widths)
    expected = sum(_layer_macs(w["num_attention_heads"], w["intermediate_size"]) for w in widths) + VOCAB * HIDDEN
    assert macs_per_token(pruned) == expected
    assert ceiling(model, pruned) == 142_080 / expected
    # the dense model is untouched and shares its embedding and lm_head with the copy
    assert macs_per_token(model) == 142_080
    assert pruned.lm_head.weight is model.lm_head.weight
    assert pruned.model.embed_tokens.weight is model.model.embed_tokens.weight


def test_round_to_rounds_kept_mlp_widths(tiny_model_factory):
    model = tiny_model_factory("llama", layers=4)
    pruned = pruned_copy(model, Variant(0.5, round_to=(16,)))
    assert all(adapter_for(pruned).widths(layer)["intermediate_size"] % 16 == 0
               for layer in adapter_for(pruned).layers())


def test_roundings_that_give_the_same_widths_share_one_variant(tiny_model_factory):
    model = tiny_model_factory("llama", layers=4)
    # 1000 exceeds every width, so it rounds nothing: the same model as round-to 1
    variants = plan_variants(model, [0.3], [1, 1000, 16])
    assert [v.label for v in variants] == ["dense", "30% round-to 1/1000", "30% round-to 16"]


def _real_prune(model, folder):
    """A global, rounded plan of a copy of `model`, saved as a prune's plan.json and report.json in `folder`."""
    import copy

    from hywia.pruning import allocate_global, apply_plan, select

    adapter = adapter_for(model)
    generator = torch.Generator().manual_seed(1)
    scores = {(i, s.kind): torch.rand(s.count, generator=generator)
              for i in (1, 2) for s in adapter.group_specs(adapter.layers()[i])}
    plan = select(adapter, scores, allocate_global(adapter, [1, 2], 0.15, scores, round_to=8))
    pruned = apply_plan(copy.deepcopy(model), plan)
    folder.mkdir()
    (folder / "plan.json").write_text(json.dumps(plan.to_dict()))
    widths = [adapter_for(pruned).widths(layer) for layer in adapter_for(pruned).layers()]
    (folder / "report.json").write_text(json.dumps({"layers": widths, "recipe": {"prune": {"ratio": 0.15,
                                                                                          "round_to": 8}}}))
    return pruned, widths


def test_a_real_plan_is_timed_at_its_own_widths(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama", layers=4)
    pruned, widths = _real_prune(model, tmp_path / "run-a")
    share = 1 - adapter_for(pruned).num_decoder_params() / adapter_for(model).num_decoder_params()
    from_report = plan_variant(model, tmp_path / "run-a" / "report.json")
    from_plan = plan_variant(model, tmp_path / "run-a" / "plan.json")
    assert from_report.keep and from_report.keep == from_plan.keep and from_report.ratio == pytest.approx(share)
    assert from_report.label == f"run-a ({share:.1%})"
    (tmp_path / "kept-widths.json").write_text((tmp_path / "run-a" / "report.json").read_text())
    assert plan_variant(model, tmp_path / "kept-widths.json").label == f"kept-widths ({share:.1%})"
    copy_ = pruned_copy(model, from_report)
    assert [adapter_for(copy_).widths(layer) for layer in adapter_for(copy_).layers()] == widths
    assert macs_per_token(copy_) == macs_per_token(pruned)
    assert plan_origin(from_report.source) == {"ratio": 0.15, "round_to": 8} and plan_origin(from_plan.source) == {}
    with pytest.raises(InvalidRequestError, match="two variants share the label"):
        plan_variants(model, [], [1], [from_report.source, from_report.source])


def test_run_speed_writes_the_files_it_is_told(tiny_model_factory, tmp_path, monkeypatch):
    import benchmarks.harness.speed as harness

    model = tiny_model_factory("llama", layers=2)
    monkeypatch.setattr(harness, "build_shape", lambda name, layers, seed: (model, "tiny random llama"))
    settings = SpeedSettings(shapes=["smollm2-135m"], ratios=[0.3], round_to=[1], batch_sizes=[1], prompt_len=8,
                             new_tokens=3, compile_shapes=[], repetitions=[1])
    harness.run_speed(settings, tmp_path, "speed --name speed-default", "speed-default")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speed-default.json", "speed-default.md"]


def test_a_plan_of_another_shape_is_refused(tiny_model_factory, tmp_path):
    _real_prune(tiny_model_factory("llama", layers=4), tmp_path / "run-a")
    with pytest.raises(InvalidRequestError, match="has 4 layers, the model 2"):
        plan_variant(tiny_model_factory("llama", layers=2), tmp_path / "run-a" / "report.json")
    with pytest.raises(InvalidRequestError, match="layer 1 mlp keeps .* cannot hold"):
        plan_variant(tiny_model_factory("llama", layers=4, mlp=8), tmp_path / "run-a" / "plan.json")


def test_repetitions_per_shape():
    settings = SpeedSettings(shapes=["smollm2-135m", "llama-7b-shaped"], repetitions=[3, 1])
    assert (settings.repetitions_of("smollm2-135m"), settings.repetitions_of("llama-7b-shaped")) == (3, 1)
    assert SpeedSettings(repetitions=[2]).repetitions_of("llama-7b-shaped") == 2


def test_chunked_decode_continues_exactly_where_it_stopped(tiny_model_factory):
    from transformers import GenerationConfig

    model = tiny_model_factory("llama", layers=2)
    prompt = torch.tensor([[5], [7]])
    decoder = Decoder(model, prompt)
    for tokens in chunk_sizes(7, 3):
        decoder.advance(tokens)
    config = GenerationConfig(max_new_tokens=7, min_new_tokens=7, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        once = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    assert torch.equal(decoder.ids, once)  # the same tokens as a generate forced to full length by min_new_tokens
    assert chunk_sizes(7, 3) == [4, 3] and decoder.steps == 7 - 2
    assert chunk_sizes(128, 32) == [32] * 4 and chunk_sizes(3, 32) == [3]


@pytest.mark.slow
def test_static_compiled_decode_gives_the_plain_tokens(tiny_model_factory):
    """torch.compile takes about a minute even on the tiny model."""
    model = tiny_model_factory("llama", layers=2)
    prompt = torch.tensor([[5], [7]])
    plain, twin = Decoder(model, prompt), compiled_twin(model)
    compiled = Decoder(twin, prompt, static_cache(twin, 1 + 6))
    for tokens in chunk_sizes(6, 3):
        plain.advance(tokens)
        compiled.advance(tokens)
    assert torch.equal(plain.ids, compiled.ids)
    assert twin.lm_head.weight is model.lm_head.weight


def test_measure_runs_one_repetition_and_returns_json_fields(tiny_model_factory):
    model = tiny_model_factory("llama", layers=2)
    models = {"dense": model, "50%": pruned_copy(model, Variant(0.5))}
    result = measure(models, vocab_size=VOCAB, batch_sizes=(1, 2), prompt_len=8, new_tokens=6, decode_chunk=3,
                     repetitions=1)
    assert set(result) == {"prefill b1", "prefill b2", "decode b1", "decode b2"}
    for name, entry in result.items():
        assert entry["unit"] == ("s" if name.startswith("prefill") else "tokens/s")
        assert set(entry["samples"]) == set(entry["median"]) == {"dense", "50%"}
        assert all(len(v) == 1 and v[0] > 0 for v in entry["samples"].values())
        assert set(entry["speedup"]) == {"50%"} and entry["speedup"]["50%"] > 0
        assert entry["speedup_samples"]["50%"] == [entry["speedup"]["50%"]]
    json.dumps(result)


def test_benchmark_shape_relates_speedups_to_ceilings(tiny_model_factory):
    model = tiny_model_factory("llama", layers=2)
    settings = SpeedSettings(ratios=[0.3], round_to=[1, 16], batch_sizes=[1], prompt_len=8, new_tokens=3,
                             repetitions=[1])
    shape = benchmark_shape("tiny", model, "tiny random llama", settings)
    labels = [row["label"] for row in shape["variants"]]
    assert labels == ["dense", "30% round-to 1", "30% round-to 16"]
    assert shape["variants"][0]["ceiling"] == 1.0
    for entry in shape["measurements"].values():
        for row in shape["variants"][1:]:
            assert entry["of_ceiling"][row["label"]] == entry["speedup"][row["label"]] / row["ceiling"]
    record = {"command": "hywia bench --speed", "settings": settings.__dict__, "load_average_before": (1.0, 1.0, 1.0),
              "machine": {"cpu": "test", "cores": 1, "torch": torch.__version__, "transformers": "x"},
              "shapes": [shape], "seconds": 1.0, "load_average_after": (1.0, 1.0, 1.0)}
    json.dumps(record)
    markdown = render_markdown(record)
    assert "`hywia bench --speed`" in markdown and "| 30% round-to 16 |" in markdown


def test_speed_script_dispatches_with_its_settings(monkeypatch, capsys):
    import importlib.util
    from pathlib import Path

    script_path = Path(__file__).parents[2] / "benchmarks" / "speed.py"
    monkeypatch.syspath_prepend(str(script_path.parent))  # the script imports its harness as `harness.speed`
    spec = importlib.util.spec_from_file_location("speed_script", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    calls = []
    monkeypatch.setattr(script, "run_speed",
                        lambda settings, out_dir, command, name: calls.append((settings, command, name)))
    monkeypatch.setattr(script, "render_markdown", lambda record: "table")
    assert script.main(["--repetitions", "1", "--shapes", "smollm2-135m", "--seed", "3"]) == 0
    settings, command, name = calls[0]
    assert settings.shapes == ["smollm2-135m"] and settings.repetitions_of("smollm2-135m") == 1
    assert (settings.seed, settings.ratios) == (3, [0.2, 0.5])
    assert command.startswith("python benchmarks/speed.py --shapes smollm2-135m")
    assert "--round-to 1,8,64" in command and "table" in capsys.readouterr().out
    assert name == "speed" and "--name" not in command
    assert script.main(["--repetitions", "1", "--plans", "a/report.json", "--name", "speed-default"]) == 0
    settings, command, name = calls[1]
    assert settings.plans == ["a/report.json"] and name == "speed-default"
    assert command.endswith("--plans a/report.json --seed 0 --name speed-default")


def test_the_cli_has_no_speed_benchmark():
    from hywia.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--speed"])


def test_empty_list_settings_round_trip_as_none():
    import argparse

    from benchmarks.harness.speed import add_speed_flags, command_line, settings_from_args

    parser = argparse.ArgumentParser()
    add_speed_flags(parser)
    parser.add_argument("--seed", type=int, default=0)
    settings = settings_from_args(parser.parse_args(["--compile-shapes", "none"]))
    assert settings.compile_shapes == [] and settings.compile_batch_sizes == [8]
    command = command_line(["speed"], settings)
    assert "--compile-shapes none" in command
    assert settings_from_args(parser.parse_args(command.split()[1:])) == settings
