"""What a whole `hywia prune` costs per recipe, in CPU seconds, against the FLAP recipe (issue 17, goal 3: the
default at most 2x FLAP's recipe in the same tool). Each prune runs in a fresh process, recipes interleaved per
repetition; CPU seconds are the process's user + system time (steadier than wall seconds on a shared machine), and
each stage's CPU seconds come from the prune's report. Writes benchmarks/results/NAME.json and .md.

    python benchmarks/prune_cost.py --ratio 0.2 --repeats 1 \
        --recipe "default=" --recipe "flap=--criterion flap --allocation global:attention_weight=1 --compensate bias"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GOAL = 2.0  # the default's CPU seconds over the FLAP recipe's, at most
STAGES = ("load", "calibrate", "score", "plan", "compensate", "cut", "report")

# Runs the prune as the only child and prints the child's CPU seconds last.
_WRAPPER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "usage = resource.getrusage(resource.RUSAGE_CHILDREN); "
            "print('CPU_SECONDS', usage.ru_utime + usage.ru_stime); sys.exit(code)")


def run_prune(flags: list[str], ratio: float, out: Path) -> dict:
    """One prune in a fresh process: its CPU and wall seconds and its report's stages."""
    command = [sys.executable, "-m", "hywia.cli", "prune", "--ratio", str(ratio), "--ppl-text", "none",
               "--out", str(out), *flags]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *command], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if done.returncode != 0:
        raise RuntimeError(f"prune {' '.join(flags)} failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"cpu_seconds": float(done.stdout.rsplit("CPU_SECONDS", 1)[1].split()[0]),
            "wall_seconds": round(time.perf_counter() - started, 1), "criterion": report["criterion"],
            "allocation": report["allocation"], "compensate": report["compensate"],
            "stages": {name: report["stages"][name] for name in STAGES if name in report["stages"]}}


def render(result: dict) -> str:
    recipes, reference = result["recipes"], result["reference"]
    base = median(run["cpu_seconds"] for run in result["runs"][reference])
    lines = [f"Whole `hywia prune --ratio {result['ratio']}` on {result['model']} (load to save, `--ppl-text none`), "
             f"each in a fresh process, {result['repeats']} repetition(s) interleaved; load average "
             f"{result['load_average_start'][0]:.1f} at start, {result['load_average_end'][0]:.1f} at end. "
             "CPU seconds of the whole process (median over repetitions); per stage: its CPU seconds in the "
             "report.", "",
             "| recipe | flags | CPU s | / " + f"`{reference}`" + " | wall s | " + " | ".join(STAGES) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(STAGES)]
    for name, flags in recipes.items():
        runs = result["runs"][name]
        cpu = median(run["cpu_seconds"] for run in runs)
        stages = [median(run["stages"].get(stage, {}).get("cpu_seconds", 0.0) for run in runs) for stage in STAGES]
        lines.append(f"| `{name}` | `{flags or '(defaults)'}` | {cpu:.0f} | {cpu / base:.2f} | "
                     f"{median(run['wall_seconds'] for run in runs):.0f} | "
                     + " | ".join(f"{value:.1f}" for value in stages) + " |")
    if "default" in recipes and reference != "default":
        ratio = median(r["cpu_seconds"] for r in result["runs"]["default"]) / base
        lines += ["", f"Goal (default <= {GOAL:g}x `{reference}`): {'met' if ratio <= GOAL else 'not met'}, "
                      f"{ratio:.2f}x."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", action="append", required=True,
                        help="NAME=FLAGS (prune flags; empty for the defaults), repeatable")
    parser.add_argument("--reference", default="flap", help="the recipe the others are divided by")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct (embedded)", help="described in the table only")
    parser.add_argument("--name", default="prune-cost")
    args = parser.parse_args()
    recipes = dict(item.split("=", 1) for item in args.recipe)
    if args.reference not in recipes:
        parser.error(f"--reference {args.reference!r} is not one of the recipes ({', '.join(recipes)})")
    result = {"ratio": args.ratio, "repeats": args.repeats, "model": args.model, "recipes": recipes,
              "reference": args.reference, "load_average_start": list(os.getloadavg()),
              "runs": {name: [] for name in recipes}}
    with tempfile.TemporaryDirectory(prefix="hywia-prune-cost-") as folder:
        for repeat in range(args.repeats):
            for name, flags in recipes.items():
                out = Path(folder) / f"{name}-{repeat}"
                result["runs"][name].append(run_prune(shlex.split(flags), args.ratio, out))
                print(f"{name} #{repeat}: {result['runs'][name][-1]['cpu_seconds']:.0f} CPU s", flush=True)
    result["load_average_end"] = list(os.getloadavg())
    text = render(result)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
