"""Outputs that would destroy an input, cannot be written, or are the wrong kind end in one line (exit 2) before
any work; outputs are replaced only with --force; temporary folders do not outlive the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import TINY_TEXT, save_tiny_folder
from hywia.cli import main
from hywia.io import check_output, tempfiles
from hywia.errors import InvalidRequestError


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_tokenizer):
    """proj/model (a tiny dense folder) and proj/calib.txt."""
    proj = tmp_path_factory.mktemp("proj")
    save_tiny_folder(proj / "model", tiny_tokenizer)
    (proj / "calib.txt").write_text("\n\n".join([TINY_TEXT] * 6))
    return proj


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    """The system temporary folder, for this test: an empty folder of its own."""
    root = tmp_path / "system-temp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def _prune_args(proj: Path, out: Path | str, *extra: str) -> list[str]:
    return ["prune", "--model", str(proj / "model"), "--ratio", "0.3", "--criterion", "magnitude", "--layers", "0:4",
            "--calib", str(proj / "calib.txt"), "--calib-samples", "4", "--seq-len", "32", "--ppl-text", "none",
            "--device", "cpu", "--out", str(out), *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hywia: error: "), err
    return err[0]


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_that_would_delete_an_input_is_refused_with_or_without_force(files, tmp_path, capsys):
    before = _tree(files)
    offload = tmp_path / "offload"
    cases = [
        (files, "contains --model"),  # the case: proj holds the model
        (files / "model", "is also --model"),
        (files / "model" / "pruned", "lies inside --model"),
        (files / "calib.txt", "is also --calib"),
        (tmp_path, "contains --offload-folder"),
    ]
    for out, message in cases:
        for force in ([], ["--force"]):
            extra = ["--offload", "disk", "--offload-folder", str(offload)] if "offload" in message else []
            assert main(_prune_args(files, out, *force, *extra)) == 2, (out, force)
            assert message in _one_error_line(capsys)
    assert _tree(files) == before and not offload.exists()

    data = files / "alpaca.jsonl"  # tune's data file inside a --force'd OUT
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    try:
        assert main(["tune", "--model", str(files / "model"), "--data", str(data), "--out", str(files),
                     "--force"]) == 2
        assert "contains --model" in _one_error_line(capsys)
        chain_data = tmp_path / "chain" / "data.jsonl"
        chain_data.parent.mkdir()
        chain_data.write_text(data.read_text())
        assert main([*_prune_args(files, chain_data.parent, "--force"), "--tune", "--tune-data", str(chain_data)]) == 2
        assert "contains --tune-data" in _one_error_line(capsys)
    finally:
        data.unlink()
    assert main(["export", "--model", str(files / "model"), "--gguf", str(files / "model" / "m.gguf")]) == 2
    assert "lies inside --model" in _one_error_line(capsys)
    assert main(["eval", "--model", str(files / "model"), "--ppl-text", str(files / "calib.txt"), "--tasks", "none",
                 "--out", str(files / "calib.txt"), "--force"]) == 2
    assert "is also --ppl-text" in _one_error_line(capsys)
    assert _tree(files) == before


def test_force_never_deletes_the_current_folder_or_one_above(files, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", "..", str(work), str(tmp_path.parent)):
        assert main(_prune_args(files, out, "--force")) == 2, out
        assert "current folder or one above it" in _one_error_line(capsys)
    assert [p.name for p in work.iterdir()] == ["keep.txt"]
    assert main(_prune_args(files, Path.home(), "--force")) == 2
    assert "home folder or one above it" in _one_error_line(capsys)


def test_out_that_cannot_be_written_fails_before_the_model_loads(files, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    cases = [
        ("/proc/hywia-out", ["--force"], "cannot write in /proc"),
        (a_file / "out", [], "is a file, so nothing can be written below it"),
        (a_file, ["--force"], "exists and is not a folder"),
        (link, ["--force"], "is a symbolic link"),
    ]
    for out, extra, message in cases:  # one line on stderr: the model's loading bar never started
        assert main(_prune_args(files, out, *extra)) == 2, out
        assert message in _one_error_line(capsys)
    assert a_file.read_text() == "mine" and not (tmp_path / "elsewhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "link"]


def test_check_output_probe_leaves_nothing(tmp_path):
    check_output(tmp_path / "new" / "deeper", file=False)
    check_output(tmp_path / "model.gguf", file=True)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InvalidRequestError, match="already exists"):
        check_output(tmp_path, file=False)
    check_output(tmp_path, existing_ok=True)  # a run that continues in its folder


def test_eval_out_is_a_file_replaced_only_with_force(files, tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(files / "model"), "--ppl-text", str(files / "calib.txt"), "--ppl-tokens", "64",
            "--seq-len", "32", "--tasks", "none", "--device", "cpu", "--out"]
    assert main([*args, str(tmp_path)]) == 2
    assert "is a folder; give a file name" in _one_error_line(capsys)
    out.write_text("earlier result")
    assert main([*args, str(out)]) == 2
    assert "already exists; pass --force" in _one_error_line(capsys)
    assert out.read_text() == "earlier result"
    assert main([*args, str(out), "--force"]) == 0
    assert json.loads(out.read_text())["perplexity"]  # replaced by the new record, written in one step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_export_force_onto_a_folder_is_refused(files, tmp_path, capsys):
    folder = tmp_path / "model.gguf"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    assert main(["export", "--model", str(files / "model"), "--gguf", str(folder), "--force"]) == 2
    assert "is a folder; give a file name" in _one_error_line(capsys)
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]


def test_cli_disk_offload_leaves_no_temporary_folder_but_keeps_the_users(files, tmp_path, temp_root, capsys):
    assert main(_prune_args(files, tmp_path / "out", "--offload", "disk")) == 0
    assert list(temp_root.glob("hywia-*")) == []
    mine = tmp_path / "my-offload"
    assert main(_prune_args(files, tmp_path / "out2", "--offload", "disk", "--offload-folder", str(mine))) == 0
    assert any(mine.iterdir()) and list(temp_root.glob("hywia-*")) == []
    capsys.readouterr()


def test_python_api_disk_offload_folder_is_removed_at_interpreter_exit(files, tmp_path):
    """The returned model reads from the folder until the program ends; then it goes."""
    temp = tmp_path / "system-temp"
    temp.mkdir()
    program = (
        "import sys, hywia\n"
        f"result = hywia.prune({str(files / 'model')!r}, ratio=0.3, criterion='magnitude', layers='0:4', "
        f"calib={str(files / 'calib.txt')!r}, calib_samples=4, seq_len=32, ppl_text=None, device='cpu', "
        "offload='disk', progress=False)\n"
        "folder = result.report['placement']['offload_folder']\n"
        "import os; assert os.listdir(folder), 'the model reads its weights from there'\n"
        "print(folder)\n"
    )
    env = {**os.environ, "TMPDIR": str(temp)}
    run = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert Path(run.stdout.strip().splitlines()[-1]).parent == temp
    assert [p.name for p in temp.iterdir() if p.name.startswith("hywia-")] == []


def test_stale_temporaries_of_ended_runs_are_removed_and_live_ones_kept(files, tmp_path, temp_root, capsys):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = int(ended.stdout), os.getppid()
    out = tmp_path / "out"
    stale = [temp_root / f"hywia-activations-{dead}-abcd1234", temp_root / f"hywia-offload-{dead}-x_9y",
             tmp_path / f".out.tmp-{dead}-k2j4h5g6"]
    kept = [temp_root / f"hywia-activations-{live}-abcd1234", tmp_path / f".out.tmp-{live}-k2j4h5g6",
            temp_root / f"hywia-cache-{dead}", tmp_path / f".other.tmp-{dead}-k2j4h5g6"]
    for folder in stale + kept:
        folder.mkdir()
        (folder / "weights.bin").write_bytes(bytes(2**20))
    assert main(_prune_args(files, out)) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hywia:")]
    assert len(err) == 1 and "removed 3 temporary file(s) of ended hywia runs (3.0 MiB)" in err[0], err
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert tempfiles.stale_temporaries([out]) == []


def test_an_old_output_left_between_two_renames_is_kept_until_the_new_one_exists(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = tmp_path / f".out.old-{int(ended.stdout)}-abcd1234"
    old.mkdir()
    assert tempfiles.stale_temporaries([tmp_path / "out"]) == []
    (tmp_path / "out").mkdir()
    assert tempfiles.stale_temporaries([tmp_path / "out"]) == [old]
