"""Models larger than the device: decoder layers offloaded to disk with accelerate, streamed one at a time through
calibration, scoring and surgery, give the same statistics, the same groups and the same pruned model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_TEXT, build_tiny_model
from hywia import prune
from hywia.errors import InvalidRequestError
from hywia.importance import collect_statistics
from hywia.io import load_model
from hywia.models import adapter_for
from hywia.offload import is_offloaded, place


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join([TINY_TEXT] * 6))
    return path


def _prune(model, tokenizer, calib, **kwargs):
    return prune(model, tokenizer=tokenizer, calib=calib, calib_samples=4, seq_len=32, layers="0:4", ratio=0.3,
                 ppl_text=str(calib), ppl_tokens=256, progress=False, **kwargs)


def _layer_params_on_meta(model) -> bool:
    return all(p.device.type == "meta" for layer in adapter_for(model).layers() for p in layer.parameters())


@pytest.mark.parametrize("criterion,options", [
    ("taylor-element2", {}),  # the defaults: global allocation, least-squares compensation
    ("wanda-sp", {"compensate": "bias"}),
    ("hywia", {}),  # the learned fusion runs its soft-masked forwards through the streamed layers
    ("flap", {"compensate": "bias"}),  # reads the output projections' weights of offloaded layers
])
def test_disk_offload_prunes_the_same_groups(tiny_tokenizer, calib_file, tmp_path, criterion, options):
    in_memory = _prune(build_tiny_model("llama"), tiny_tokenizer, calib_file, criterion=criterion, **options)
    out = tmp_path / "pruned"
    offloaded = _prune(build_tiny_model("llama"), tiny_tokenizer, calib_file, criterion=criterion, offload="disk",
                       offload_folder=tmp_path / "offload", out=out, **options)
    assert offloaded.plan == in_memory.plan
    assert _layer_params_on_meta(offloaded.model)  # still streamed after surgery, at the pruned sizes
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        expected = in_memory.model(input_ids=ids).logits
        torch.testing.assert_close(offloaded.model(input_ids=ids).logits, expected)
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits, expected)
    assert offloaded.report["placement"]["offload"] == "disk"


def test_statistics_of_an_offloaded_model_equal_in_memory(tmp_path):
    batches = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(0))
    results = []
    for offload in (None, "disk"):
        model = build_tiny_model("qwen2")
        if offload:
            model = place(model, offload=offload, device_map=None, device="cpu", folder=tmp_path)
            assert is_offloaded(model)
        results.append(collect_statistics(model, adapter_for(model), [1, 2], batches, progress=False))
        if offload:
            assert _layer_params_on_meta(model)
    for key, terms in results[0].taylor.items():
        for term in ("fine1", "fine2", "coarse1", "coarse2"):
            torch.testing.assert_close(getattr(results[1].taylor[key], term), getattr(terms, term))
    for name, value in results[0].act_sq.items():
        torch.testing.assert_close(results[1].act_sq[name], value)


def test_load_model_offloads_the_decoder_layers(tiny_tokenizer, tmp_path):
    original = build_tiny_model("llama")
    original.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    loaded, _ = load_model(str(tmp_path / "model"), device="cpu", offload="disk", offload_folder=tmp_path / "offload")
    assert _layer_params_on_meta(loaded)
    assert loaded.model.embed_tokens.weight.device.type == "cpu"
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, original(input_ids=ids).logits)


def test_refusals(tiny_tokenizer, calib_file):
    with pytest.raises(InvalidRequestError, match="give one of them"):
        _prune(build_tiny_model("llama"), tiny_tokenizer, calib_file, offload="disk", device_map="auto")
    with pytest.raises(InvalidRequestError, match="--offload"):
        _prune(build_tiny_model("llama"), tiny_tokenizer, calib_file, offload="gpu")
    with pytest.raises(InvalidRequestError, match="layerwise"):
        _prune(build_tiny_model("llama"), tiny_tokenizer, calib_file, offload="disk", importance_path="plain",
               criterion="taylor-element1")


def test_cli_plain_in_memory_and_layerwise_from_a_device_map_agree(tiny_tokenizer, calib_file, tmp_path):
    import json

    from hywia.cli import main

    folder = tmp_path / "model"
    build_tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    placement = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                 "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk", "model.layers.3": "cpu"}
    (tmp_path / "map.json").write_text(json.dumps(placement))
    common = ["prune", "--model", str(folder), "--ratio", "0.3", "--criterion", "taylor-element2", "--layers", "0:4",
              "--calib", str(calib_file), "--calib-samples", "4", "--seq-len", "32", "--ppl-text", "none"]
    assert main(common + ["--importance-path", "plain", "--out", str(tmp_path / "plain")]) == 0
    assert main(common + ["--device-map", str(tmp_path / "map.json"), "--offload-folder", str(tmp_path / "off"),
                          "--out", str(tmp_path / "mapped")]) == 0
    plans = [json.loads((tmp_path / name / "plan.json").read_text()) for name in ("plain", "mapped")]
    assert plans[0] == plans[1]
    report = json.loads((tmp_path / "mapped" / "report.json").read_text())
    assert report["importance_path"] == "layerwise" and report["placement"]["device_map"] == placement


def _self_calibration_pipelines(tokenizer, folder, progress: bool):
    """A pipeline over the same tiny model in memory, then with its layers offloaded to disk, both on `--calib self`."""
    from hywia.pipeline import Pipeline
    from hywia.settings import CalibrationConfig

    calibration = CalibrationConfig(calib="self", calib_samples=3, seq_len=24)
    for offload in (None, "disk"):
        model = build_tiny_model("llama")
        if offload:
            model = place(model, offload=offload, device_map=None, device="cpu", folder=folder)
        yield Pipeline(model, tokenizer, calibration=calibration, progress=progress)


def test_an_offloaded_model_samples_the_same_self_calibration(tiny_tokenizer, tmp_path):
    """`--calib self` samples through the streamed layers on their execution device: the same windows as in memory."""
    windows = [pipeline.windows() for pipeline in _self_calibration_pipelines(tiny_tokenizer, tmp_path, False)]
    torch.testing.assert_close(windows[1], windows[0], atol=0, rtol=0)


def test_self_calibration_through_offloaded_layers_says_what_it_streams(tiny_tokenizer, tmp_path, capsys):
    """Writing the `self` windows streams offloaded layers once per decoding step: the user is told how many steps
    and what skips them; a model in memory gets no such note."""
    from hywia.data.generated import generation_steps

    notes = []
    for pipeline in _self_calibration_pipelines(tiny_tokenizer, tmp_path, True):
        pipeline.windows()
        notes.append([line for line in capsys.readouterr().err.splitlines() if "note:" in line])
    assert notes[0] == []
    assert len(notes[1]) == 1 and f"in {generation_steps(3, 24)} decoding steps" in notes[1][0]
    assert "--calib mix" in notes[1][0]
