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


@pytest.mark.parametrize("flags, message", [
    (["--criterion", "hywia:8"], "give settings as key=value"),
    (["--allocation", "global:floor=2"], "floor must lie in"),
    (["--compensate", "lstsq:ridge=x"], "ridge must be float"),
    (["--seed", "one"], "seed must be int"),
    (["--recipe", "missing.json"], "cannot read recipe"),
])
def test_cli_refuses_bad_settings_in_one_line(tmp_path, capsys, flags, message):
    assert main(["prune", "--ratio", "0.2", *flags, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o").exists()


def test_cli_needs_a_ratio_unless_the_recipe_has_one(tmp_path, capsys):
    assert main(["prune", "--out", str(tmp_path / "o")]) == 2
    assert "--ratio is required" in capsys.readouterr().err
