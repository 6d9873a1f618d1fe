"""Peak memory of the whole default `hywia prune` (load to save) against a process that only imports hywia, loads
the model and runs one forward; each in a fresh process. Writes benchmarks/results/memory.json and memory.md.

    python benchmarks/memory.py [--model NAME_OR_FOLDER] [--ratio 0.2] [--name memory] [-- EXTRA PRUNE FLAGS]

Every figure is peak resident memory (VmHWM/ru_maxrss) in MB and as a multiple of the weights' bytes; "over
baseline" is the prune's peak minus the baseline's, over the weights' bytes (the issue's goal: at most 0.5). The
stages reset the kernel's peak mark as they start (hywia.measure), so the prune's whole-process peak is the
largest of its report's stage peaks and the peak after the last reset (saving included), which the child's
ru_maxrss gives.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GOAL_OVER_BASELINE = 0.5

# Runs one command as its only child and prints the child's peak RSS (MB) last.
_WRAPPER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print('PEAK_MB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); sys.exit(code)")

# The baseline: import hywia, load the model, one forward of one calibration-length window.
_BASELINE = """
import json, sys, torch
import hywia
from hywia.io import load_model
model, tokenizer = load_model(sys.argv[1] or None, device="cpu")
with torch.no_grad():
    model(input_ids=torch.randint(0, len(tokenizer), (1, int(sys.argv[2]))), use_cache=False)
weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print("WEIGHTS_BYTES", weights)
"""


def _measure(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """(peak RSS in MB of `command` in a fresh process, its stdout)."""
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *command], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed:\n{done.stderr[-3000:]}")
    peak = float(done.stdout.rsplit("PEAK_MB", 1)[1].split()[0])
    return peak, done.stdout


def baseline(model: str | None, seq_len: int, env: dict[str, str]) -> dict:
    peak, out = _measure([sys.executable, "-c", _BASELINE, model or "", str(seq_len)], env)
    return {"peak_rss_mb": round(peak, 1), "weights_bytes": int(out.split("WEIGHTS_BYTES")[1].split()[0])}


def default_prune(model: str | None, ratio: float, extra: list[str], env: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="hywia-memory-") as folder:
        out = Path(folder) / "pruned"
        command = [sys.executable, "-m", "hywia.cli", "prune", "--ratio", str(ratio), "--out", str(out), *extra]
        if model:
            command += ["--model", model]
        after_last_reset, _ = _measure(command, env)
        report = json.loads((out / "report.json").read_text())
    stages = {name: {"seconds": entry["seconds"], "peak_rss_mb": entry["peak_rss_mb"]}
              for name, entry in report["stages"].items()}
    return {"peak_rss_mb": round(max(report["peak_rss_mb"], after_last_reset), 1),
            "peak_after_last_stage_start_mb": round(after_last_reset, 1), "seconds": report["seconds"],
            "stages": stages, "command": ["hywia", *[("OUT" if arg == str(out) else arg) for arg in command[3:]]]}


def render(record: dict) -> str:
    weights_mb = record["weights_bytes"] / 2**20
    base = record["baseline"]["peak_rss_mb"]
    prune = record["prune"]

    def ratio(mb: float) -> str:
        return f"{mb / weights_mb:.2f}"

    lines = [
        f"Model {record['model']}: weights {weights_mb:.0f} MB. Command: `{' '.join(prune['command'])}`. "
        f"Peak RSS per process, and as a multiple of the weights' bytes.",
        "",
        "| process / stage | seconds | peak RSS (MB) | x weights | over baseline (x weights) |",
        "|---|---:|---:|---:|---:|",
        f"| baseline: import + load + one forward | | {base:.0f} | {ratio(base)} | 0 |",
        f"| **default prune, whole command** | {prune['seconds']:.0f} | {prune['peak_rss_mb']:.0f} | "
        f"{ratio(prune['peak_rss_mb'])} | **{(prune['peak_rss_mb'] - base) / weights_mb:.2f}** |",
    ]
    for name, entry in prune["stages"].items():
        lines.append(f"| stage {name} | {entry['seconds']:.1f} | {entry['peak_rss_mb']:.0f} | "
                     f"{ratio(entry['peak_rss_mb'])} | {(entry['peak_rss_mb'] - base) / weights_mb:.2f} |")
    lines.append(f"| after the last stage started (report, saving) | | {prune['peak_after_last_stage_start_mb']:.0f} | "
                 f"{ratio(prune['peak_after_last_stage_start_mb'])} | "
                 f"{(prune['peak_after_last_stage_start_mb'] - base) / weights_mb:.2f} |")
    over = (prune["peak_rss_mb"] - base) / weights_mb
    lines += ["", f"Goal: at most {GOAL_OVER_BASELINE}x the weights over the baseline; measured {over:.2f}x "
                  f"({'met' if over <= GOAL_OVER_BASELINE else 'not met'})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="name or folder (default: hywia's embedded SmolLM2-135M)")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--seq-len", type=int, default=128, help="the baseline forward's window (the default's)")
    parser.add_argument("--name", default="memory", help="file name of the results (NAME.json, NAME.md)")
    parser.add_argument("extra", nargs="*", help="further prune flags after --, e.g. -- --calib-samples 8")
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("OMP_NUM_THREADS", "1")
    base = baseline(args.model, args.seq_len, env)
    prune = default_prune(args.model, args.ratio, args.extra, env)
    record = {"model": args.model or "SmolLM2-135M-Instruct (embedded, float32)", "ratio": args.ratio,
              "weights_bytes": base["weights_bytes"], "baseline": base, "prune": prune,
              "over_baseline_x_weights": round((prune["peak_rss_mb"] - base["peak_rss_mb"])
                                               / (base["weights_bytes"] / 2**20), 3),
              "goal_over_baseline_x_weights": GOAL_OVER_BASELINE}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    text = render(record)
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
