import pytest

from hywia.cli import main


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["prune", "--ratio", "1.5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ratio" in err[0]
    assert main(["prune", "--ratio", "0.2", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_requires_ratio_and_out():
    with pytest.raises(SystemExit):
        main(["prune"])
