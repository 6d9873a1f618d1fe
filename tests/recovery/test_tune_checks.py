"""`hywia tune` refuses nonsensical numbers and unusable resumes in one line, before OUT is created or the model is
loaded, and a fresh run stopped before its first checkpoint leaves no stub OUT that would block the retry."""

from __future__ import annotations

import json

import pytest

import hywia.recovery.api as recovery_api
from conftest import build_tiny_model
from hywia.cli import Stopped, main

ALPACA = [{"instruction": f"Say {word}.", "input": "", "output": f"{word} {word}."} for word in ("fox", "dog", "cat")]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("tune-checks")
    build_tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    (root / "alpaca.jsonl").write_text("\n".join(json.dumps(record) for record in ALPACA) + "\n")
    return root


def _args(files, out, *extra: str) -> list[str]:
    return ["tune", "--model", str(files / "model"), "--data", str(files / "alpaca.jsonl"), "--out", str(out),
            "--batch-size", "2", "--ppl-text", "none", *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hywia: error: "), err
    return err[0]


@pytest.mark.parametrize("flags,message", [
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--epochs", "inf"], "--epochs must be a positive number"),
    (["--steps", "-3"], "--steps must be at least 1"),
    (["--lora-r", "0"], "--lora-r must be at least 1"),
    (["--lora-alpha", "0"], "--lora-alpha must be at least 1"),
    (["--lora-dropout", "1"], "--lora-dropout must lie in [0, 1)"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--cutoff-len", "1"], "--cutoff-len must be at least 2"),
    (["--save-steps", "0"], "--save-steps must be at least 1"),
])
def test_nonsensical_numbers_fail_before_out_exists(files, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(_args(files, out, *flags)) == 2
    assert message in _one_error_line(capsys)
    assert not out.exists()


def test_resume_needs_a_usable_checkpoint(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(files, out, "--resume", "--steps", "2")) == 2
    assert "holds no checkpoint to continue from; drop --resume" in _one_error_line(capsys)
    out.mkdir()
    assert main(_args(files, out, "--resume", "--steps", "2")) == 2
    assert "holds no checkpoint" in _one_error_line(capsys)
    out.rmdir()

    assert main(_args(files, out, "--steps", "2", "--save-steps", "2")) == 0
    capsys.readouterr()
    checkpoint = out / "checkpoints" / "checkpoint-2"
    originals = {path.name: path.read_bytes() for path in checkpoint.iterdir() if path.is_file()}
    damages = [
        ("adapter_model.safetensors", lambda data: data[: len(data) // 2]),
        ("trainer_state.json", lambda data: data[:-10]),
        ("optimizer.pt", lambda data: data[: len(data) - 200]),
        ("scheduler.pt", lambda data: b"not a torch archive"),
    ]
    for name, damage in damages:
        (checkpoint / name).write_bytes(damage(originals[name]))
        assert main(_args(files, out, "--resume", "--steps", "4")) == 2, name
        assert f"checkpoint {checkpoint} is unusable ({name}" in _one_error_line(capsys)
        (checkpoint / name).write_bytes(originals[name])
    (checkpoint / "trainer_state.json").unlink()
    assert main(_args(files, out, "--resume", "--steps", "4")) == 2
    assert "trainer_state.json is missing" in _one_error_line(capsys)
    (checkpoint / "trainer_state.json").write_bytes(originals["trainer_state.json"])
    assert main(_args(files, out, "--resume", "--steps", "4")) == 0  # whole again: it resumes
    assert json.loads((out / "report.json").read_text())["resumed_from"] == 2


def test_fresh_run_stopped_before_its_first_checkpoint_leaves_no_out(files, tmp_path, capsys, monkeypatch):
    def stopped_while_training(model, tokenizer, examples, out, **options):
        (out / "checkpoints").mkdir(parents=True)  # as Trainer has made it by then
        raise Stopped(15)

    out = tmp_path / "run"
    monkeypatch.setattr(recovery_api, "train_lora", stopped_while_training)
    assert main(_args(files, out, "--steps", "2")) == 143
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hywia:")]
    assert err == ["hywia: stopped by SIGTERM; its temporary files are removed"]
    assert not out.exists()
