"""SIGTERM and SIGINT during calibration end `hywia prune` in one line with 128 + the signal's number and leave no
temporary file; what SIGKILL leaves (it cannot be caught) is removed by the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import TINY_TEXT, save_tiny_folder
from hywia.cli import main

SAMPLES = "256"  # calibration long enough (seconds) to be caught in the middle


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("signals")
    save_tiny_folder(root / "model", tiny_tokenizer)
    (root / "calib.txt").write_text("\n\n".join([TINY_TEXT] * 60))
    return root


def _prune_args(files: Path, out: Path) -> list[str]:
    return ["prune", "--model", str(files / "model"), "--ratio", "0.3", "--layers", "0:4",
            "--calib", str(files / "calib.txt"), "--calib-samples", SAMPLES, "--seq-len", "64",
            "--activation-store", "disk", "--ppl-text", "none", "--device", "cpu", "--out", str(out)]


def _start_and_signal_while_calibrating(files: Path, tmp_path: Path, signum: int) -> tuple[subprocess.Popen, Path]:
    """Start `python -m hywia.cli prune` with its own temporary folder; send `signum` once its per-sample layer
    inputs are on disk (the statistics pass is running)."""
    temp = tmp_path / "system-temp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "hywia.cli", *_prune_args(files, tmp_path / "out")],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(temp.glob("hywia-activations-*/*.bin")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "calibration never started"
        time.sleep(0.02)
    os.kill(process.pid, signum)
    return process, temp


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_calibration_unwinds_and_cleans_up(files, tmp_path, signum):
    process, temp = _start_and_signal_while_calibrating(files, tmp_path, signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("hywia:")]
    assert lines == [f"hywia: stopped by {signum.name}; its temporary files are removed"], stderr[-3000:]
    assert "Traceback" not in stderr
    assert list(temp.glob("hywia-*")) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["system-temp"]  # no out, no .out.tmp-*


def test_sigkill_leftovers_are_removed_by_the_next_run(files, tmp_path, monkeypatch, capsys):
    process, temp = _start_and_signal_while_calibrating(files, tmp_path, signal.SIGKILL)
    process.communicate(timeout=120)
    leftovers = list(temp.glob(f"hywia-activations-{process.pid}-*"))
    assert len(leftovers) == 1

    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert main(["prune", "--ratio", "2", "--out", str(tmp_path / "out")]) == 2  # even a refused run sweeps first
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "removed 1 temporary file(s) of ended hywia runs" in lines[0], lines
    assert str(leftovers[0]) in lines[0] and "--ratio" in lines[1]
    assert list(temp.glob("hywia-*")) == []
