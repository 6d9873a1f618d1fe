"""`hywia.prune` end to end on tiny models, and its refusals of bad input."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from conftest import TINY_TEXT
from hywia import prune
from hywia.errors import CalibrationError, InvalidRequestError, NonFiniteWeightsError, UnsupportedModelError


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join([TINY_TEXT] * 6))
    return path


def _prune(model, tokenizer, calib, **kwargs):
    defaults = dict(tokenizer=tokenizer, calib=calib, calib_samples=4, seq_len=32, layers="0:4",
                    ppl_text=str(calib), ppl_tokens=256, progress=False)
    defaults.update(kwargs)
    return prune(model, **defaults)


@pytest.mark.parametrize("criterion", ["hywia", "taylor-element2", "wanda-sp"])
def test_prune_saves_a_reloadable_model_and_report(tiny_model_factory, tiny_tokenizer, calib_file, tmp_path,
                                                   criterion):
    model = tiny_model_factory("llama")
    out = tmp_path / "pruned"
    result = _prune(model, tiny_tokenizer, calib_file, ratio=0.3, criterion=criterion, out=out)
    report = json.loads((out / "report.json").read_text())
    for key in ("model", "criterion", "ratio_requested", "ratio_achieved", "params_before", "params_after",
                "layers", "ppl_before", "ppl_after", "fusion", "seconds", "peak_rss_mb", "ppl_text"):
        assert key in report
    assert abs(report["ratio_achieved"] - 0.3) < 0.01
    assert report["params_after"] < report["params_before"]
    assert (out / "plan.json").is_file() and (out / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits,
                                   atol=0, rtol=0)


def test_bad_ratio_and_existing_output_fail_before_work(tiny_model_factory, tiny_tokenizer, calib_file, tmp_path):
    model = tiny_model_factory("llama")
    for ratio in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(InvalidRequestError, match="ratio"):
            _prune(model, tiny_tokenizer, calib_file, ratio=ratio)
    (tmp_path / "out").mkdir()
    with pytest.raises(InvalidRequestError, match="--force"):
        _prune(model, tiny_tokenizer, calib_file, ratio=0.2, out=tmp_path / "out")
    with pytest.raises(InvalidRequestError, match="empty"):
        _prune(model, tiny_tokenizer, calib_file, ratio=0.5, layers="1:2")


def test_unsupported_architecture(tiny_tokenizer, calib_file):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        _prune(gpt2, tiny_tokenizer, calib_file, ratio=0.2)


def test_short_or_empty_calibration_text(tiny_model_factory, tiny_tokenizer, tmp_path):
    model = tiny_model_factory("llama")
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    with pytest.raises(CalibrationError, match="too short"):
        _prune(model, tiny_tokenizer, short, ratio=0.2, ppl_text=None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CalibrationError, match="empty"):
        _prune(model, tiny_tokenizer, empty, ratio=0.2, ppl_text=None)


@pytest.mark.parametrize("path", ["layerwise", "plain"])
def test_non_finite_loss_is_named_at_its_source(tiny_model_factory, tiny_tokenizer, calib_file, tmp_path, path):
    """Not at the top pruned layer, where the gradient first shows it; float32 is suggested only below float32."""
    model = tiny_model_factory("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(CalibrationError, match="weight model.layers.2.mlp.up_proj.weight holds NaN or Inf") as error:
        _prune(model, tiny_tokenizer, calib_file, ratio=0.2, ppl_text=None, importance_path=path,
               out=tmp_path / "out")
    assert "float32" not in str(error.value)
    assert not (tmp_path / "out").exists()
    overflowing = tiny_model_factory("llama")
    with torch.no_grad():
        overflowing.model.layers[1].mlp.down_proj.weight.fill_(1e38)  # finite, but the layer's output is not
    with pytest.raises(CalibrationError, match="output of model.layers.1 overflows") as error:
        _prune(overflowing, tiny_tokenizer, calib_file, ratio=0.2, ppl_text=None, importance_path=path)
    assert "float32" not in str(error.value)
    with pytest.raises(CalibrationError, match="output of model.layers.1 overflows.*--dtype float32"):
        _prune(overflowing.to(torch.bfloat16), tiny_tokenizer, calib_file, ratio=0.2, ppl_text=None,
               importance_path=path)


@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_non_finite_weights_are_never_saved(tiny_model_factory, tiny_tokenizer, calib_file, tmp_path, criterion):
    """Gradient-free criteria never meet the NaN; the save refuses it (least squares would have spread it)."""
    model = tiny_model_factory("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="not saving.*model.layers.1.mlp"):
        _prune(model, tiny_tokenizer, calib_file, ratio=0.2, criterion=criterion, ppl_text=None,
               out=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]


@pytest.fixture
def dense_folder(tiny_folder):
    return tiny_folder


def _recipe_prune(dense_folder, calib_file, out, **kwargs):
    settings = dict(ratio=0.3, criterion="hywia:steps=4", calib=calib_file, calib_samples=4, seq_len=32,
                    layers="0:4", ppl_text=str(calib_file), ppl_tokens=256, progress=False)
    return prune(str(dense_folder), out=out, **{**settings, **kwargs})


def _same_bytes(first, second, names=("plan.json", "model.safetensors")):
    return all((first / name).read_bytes() == (second / name).read_bytes() for name in names)


def test_report_records_every_stage(dense_folder, calib_file, tmp_path):
    result = _recipe_prune(dense_folder, calib_file, tmp_path / "a")
    stages = result.report["stages"]
    assert list(stages) == ["load", "perplexity_before", "calibrate", "score", "plan", "compensate", "cut", "report"]
    for entry in stages.values():
        assert entry["seconds"] >= 0 and entry["peak_rss_mb"] > 0 and entry["cpu_seconds"] >= 0
    assert stages["calibrate"]["cpu_seconds"] > 0  # the statistics pass does real work on every thread it uses
    assert result.report["peak_rss_mb"] >= max(entry["peak_rss_mb"] for entry in stages.values())


def test_a_saved_recipe_reruns_to_the_same_bytes(dense_folder, calib_file, tmp_path):
    from hywia.cli import main

    first = tmp_path / "first"
    _recipe_prune(dense_folder, calib_file, first)
    recipe = json.loads((first / "recipe.json").read_text())
    assert recipe["prune"]["criterion"].startswith("hywia:steps=4:batch_size=4:lr=0.05")  # every setting written out
    assert recipe["prune"]["compensate"] == "lstsq:ridge=0.01:holdout=0.25:decades=2"
    assert recipe["model"] == str(dense_folder)
    assert main(["prune", "--recipe", str(first / "recipe.json"), "--out", str(tmp_path / "again")]) == 0
    assert _same_bytes(first, tmp_path / "again")
    # a flag overrides the recipe; a report.json is a recipe too
    assert main(["prune", "--recipe", str(first / "report.json"), "--seed", "1", "--out", str(tmp_path / "s1")]) == 0
    assert json.loads((tmp_path / "s1" / "recipe.json").read_text())["runtime"]["seed"] == 1


def test_apply_cuts_a_dense_model_to_a_saved_plan(dense_folder, calib_file, tmp_path, capsys):
    from hywia import apply
    from hywia.cli import main

    pruned = tmp_path / "pruned"
    _recipe_prune(dense_folder, calib_file, pruned, allocation="uniform", compensate="lstsq:ridge=0.05")
    assert main(["apply", "--plan", str(pruned / "plan.json"), "--model", str(dense_folder),
                 "--out", str(tmp_path / "applied")]) == 0
    assert _same_bytes(pruned, tmp_path / "applied")
    # without the recipe the compensation must be named; then the plan alone decides what goes
    (tmp_path / "plan_only").mkdir()
    (tmp_path / "plan_only" / "plan.json").write_bytes((pruned / "plan.json").read_bytes())
    assert main(["apply", "--plan", str(tmp_path / "plan_only" / "plan.json"), "--model", str(dense_folder),
                 "--out", str(tmp_path / "x")]) == 2
    assert "--compensate" in capsys.readouterr().err
    plain = apply(tmp_path / "plan_only" / "plan.json", str(dense_folder), compensate="none", progress=False)
    assert plain.report["stages"].keys() == {"load", "cut"}
    widths = [{key: value for key, value in layer.items() if key != "added_biases"}  # no compensation, no bias
              for layer in json.loads((pruned / "config.json").read_text())["hywia_layers"]]
    assert plain.model.config.hywia_layers == widths


def test_criterion_settings_reach_the_pipeline(tiny_model_factory, tiny_tokenizer, calib_file):
    result = _prune(tiny_model_factory("llama"), tiny_tokenizer, calib_file, ratio=0.3, ppl_text=None,
                    criterion="hywia:steps=2:batch_size=1", allocation="global:floor=0.5")
    assert result.report["fusion"]["steps"] == 2
    assert result.report["recipe"]["prune"]["allocation"] == "global:floor=0.5:attention_weight=16.0"
    with pytest.raises(InvalidRequestError, match="give settings as key=value"):
        _prune(tiny_model_factory("llama"), tiny_tokenizer, calib_file, ratio=0.3, criterion="hywia:8")
