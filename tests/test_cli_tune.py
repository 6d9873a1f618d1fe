"""`hywia tune` and `hywia prune --tune` end to end on a tiny saved pruned folder with a small Alpaca JSONL."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import hywia
from conftest import TINY_TEXT, build_tiny_model
from hywia.cli import main
from hywia.recovery.api import tune_model
from hywia.recovery.lora import load_adapter

ALPACA = [
    {"instruction": "Finish the sentence.", "input": "The quick brown fox", "output": "jumps over the lazy dog."},
    {"instruction": "What does pruning remove?", "input": "", "output": "Whole channels and attention heads."},
    {"instruction": "What decides what stays?", "input": "", "output": "The importance of each group."},
    {"instruction": "What gives the gradients?", "input": "", "output": "Calibration text gives the gradients."},
    {"instruction": "Which heads are kept?", "input": "", "output": "A pruned model keeps the heads that matter."},
    {"instruction": "Name the animal.", "input": "The lazy dog", "output": "A dog."},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_tokenizer):
    """A dense tiny folder, its 30% magnitude-pruned folder (with plan.json and report.json), data and texts."""
    root = tmp_path_factory.mktemp("tune-files")
    paths = {name: root / name for name in ("dense", "pruned", "alpaca.jsonl", "text.txt")}
    build_tiny_model("llama").save_pretrained(paths["dense"])
    tiny_tokenizer.save_pretrained(paths["dense"])
    paths["alpaca.jsonl"].write_text("\n".join(json.dumps(record) for record in ALPACA) + "\n")
    paths["text.txt"].write_text("\n\n".join([TINY_TEXT] * 6))
    hywia.prune(str(paths["dense"]), ratio=0.3, criterion="magnitude", calib=paths["text.txt"], calib_samples=4,
                layers="0:4", ppl_text=str(paths["text.txt"]), out=paths["pruned"], device="cpu", progress=False)
    return paths


def _tune_args(files, out, *extra: str) -> list[str]:
    return ["tune", "--model", str(files["pruned"]), "--data", str(files["alpaca.jsonl"]), "--out", str(out),
            "--lr", "1e-2", "--batch-size", "2", *extra]


def test_tune_trains_and_merged_folder_reloads_to_adapter_logits(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_tune_args(files, out, "--steps", "6", "--merge", "--ppl-text", str(files["text.txt"]))) == 0
    printed = capsys.readouterr().out
    assert "step 1/6" in printed and "step 6/6" in printed and "saved to" in printed

    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 6 and report["resumed_from"] == 0 and report["examples"] == len(ALPACA)
    assert [entry["step"] for entry in report["loss_history"]] == list(range(1, 7))
    assert report["final_loss"] == report["loss_history"][-1]["loss"]
    # Same held-out windows as the pruning run: tuning starts where pruning ended.
    assert report["ppl_before"] == pytest.approx(report["base_report"]["ppl_after"])
    assert report["ppl_after"] != pytest.approx(report["ppl_before"])
    assert report["seconds"] > 0 and report["merged"] == "merged"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    merged_dir = out / "merged"
    assert json.loads((merged_dir / "report.json").read_text()) == report
    assert json.loads((merged_dir / "plan.json").read_text()) == json.loads((files["pruned"] / "plan.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    base = AutoModelForCausalLM.from_pretrained(files["pruned"])
    with torch.no_grad():
        untuned = base(torch.arange(24).reshape(2, 12)).logits
        unmerged = load_adapter(base, out / "adapter")(torch.arange(24).reshape(2, 12)).logits
        tuned = merged(torch.arange(24).reshape(2, 12)).logits
    torch.testing.assert_close(tuned, unmerged, atol=1e-5, rtol=0)
    assert (tuned - untuned).abs().max() > 1e-3
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_tune_resume_continues_from_saved_step(files, tmp_path, capsys):
    out = tmp_path / "run"
    args = _tune_args(files, out, "--save-steps", "2", "--ppl-text", "none")
    assert main([*args, "--steps", "4"]) == 0
    first = json.loads((out / "report.json").read_text())
    assert main([*args, "--steps", "4"]) == 2  # an existing run is neither resumed nor replaced silently
    assert "--force" in capsys.readouterr().err

    shutil.rmtree(out / "checkpoints" / "checkpoint-4")  # as if killed after the checkpoint of step 2
    assert main([*args, "--steps", "4", "--resume"]) == 0
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 4
    assert [e["step"] for e in resumed["loss_history"]] == [1, 2, 3, 4]
    assert [e["loss"] for e in resumed["loss_history"]] == pytest.approx([e["loss"] for e in first["loss_history"]])

    assert main([*args, "--steps", "6", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "step 5/6" in printed and "step 4/6" not in printed and "resumed from 4" in printed
    longer = json.loads((out / "report.json").read_text())
    assert longer["resumed_from"] == 4 and [e["step"] for e in longer["loss_history"]] == list(range(1, 7))
    assert longer["loss_history"][:4] == resumed["loss_history"]


def test_tune_bad_input_gives_one_line_and_no_output(files, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    cases = [
        (["--data", str(tmp_path / "missing.jsonl")], "instruction data file not found"),
        (["--model", str(tmp_path / "no-model")], "model folder not found"),
        (["--data", str(tmp_path / "broken.jsonl")], "invalid JSON"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--resume", "--force"], "pass only one"),
    ]
    for extra, message in cases:
        assert main(_tune_args(files, out, *extra)) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(_tune_args(files, out, "--steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--force" in err[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jsonl", "out"]


def test_prune_tune_chains_both_and_keeps_the_untuned_model(files, tmp_path, capsys):
    out = tmp_path / "chain"
    prune_args = ["prune", "--model", str(files["dense"]), "--ratio", "0.3", "--criterion", "magnitude",
                  "--calib", str(files["text.txt"]), "--calib-samples", "4", "--layers", "0:4",
                  "--ppl-text", str(files["text.txt"]), "--device", "cpu"]
    assert main([*prune_args, "--out", str(out), "--tune-steps", "3"]) == 2
    assert "need --tune" in capsys.readouterr().err and not out.exists()

    assert main([*prune_args, "--out", str(out), "--tune", "--tune-data", str(files["alpaca.jsonl"]),
                 "--tune-steps", "3", "--tune-batch-size", "2", "--tune-lr", "1e-2"]) == 0
    assert "merged/ (tuned), pruned/ (untuned)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 3 and report["base_report"]["criterion"] == "magnitude"
    assert report["ppl_before"] == pytest.approx(report["base_report"]["ppl_after"])
    pruned = AutoModelForCausalLM.from_pretrained(out / "pruned")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert (out / "pruned" / "plan.json").is_file() and (out / "merged" / "plan.json").is_file()
    assert [p.shape for p in merged.parameters()] == [p.shape for p in pruned.parameters()]
    assert sum(p.numel() for p in pruned.parameters()) == report["base_report"]["params_after"]


def test_python_api_is_exported():
    assert hywia.tune is tune_model and hywia.TuneResult.__name__ == "TuneResult"
