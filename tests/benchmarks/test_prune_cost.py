"""The prune-cost table divides each recipe's CPU seconds by the reference's and judges the default against 2x."""

from benchmarks.prune_cost import render, run_prune


def _run(cpu: float, score: float) -> dict:
    stage = {"seconds": 1.0, "cpu_seconds": 1.0, "peak_rss_mb": 1.0}
    return {"cpu_seconds": cpu, "wall_seconds": cpu * 2, "criterion": "x", "allocation": "global",
            "compensate": "lstsq", "stages": {"calibrate": stage, "score": {**stage, "cpu_seconds": score}}}


def test_the_default_is_judged_against_twice_the_reference():
    result = {"ratio": 0.2, "repeats": 2, "model": "m", "reference": "flap",
              "recipes": {"default": "", "flap": "--criterion flap --compensate bias"},
              "runs": {"default": [_run(300, 200), _run(340, 220)], "flap": [_run(100, 1), _run(120, 1)]},
              "load_average_start": [1.0, 1.0, 1.0], "load_average_end": [1.0, 1.0, 1.0]}
    text = render(result)
    assert "| `default` | `(defaults)` | 320 | 2.91 | 640 | 0.0 | 1.0 | 210.0 |" in text
    assert "Goal (default <= 2x `flap`): not met, 2.91x." in text


def test_a_prune_runs_in_a_fresh_process_and_reports_its_cpu_seconds(tiny_folder, tmp_path):
    from conftest import TINY_TEXT

    calib_text = tmp_path / "calib.txt"
    calib_text.write_text("\n\n".join([TINY_TEXT] * 6), encoding="utf-8")
    run = run_prune(["--model", str(tiny_folder), "--criterion", "magnitude", "--calib", str(calib_text),
                     "--calib-samples", "2", "--seq-len", "16", "--layers", "0:4"], 0.2, tmp_path / "o")
    assert run["cpu_seconds"] > 0 and run["criterion"] == "magnitude"
    assert set(run["stages"]) >= {"calibrate", "score", "cut"} and run["stages"]["cut"]["cpu_seconds"] >= 0
