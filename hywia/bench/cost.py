"""`hywia bench --cost`: what the importance step costs, memory-light (layerwise) path against the plain one.

Every measurement runs in a fresh Python process, so no path inherits another's allocations: the process loads the
model, makes its weights resident (the loader maps safetensors lazily), builds the calibration windows, then
resets the kernel's peak-RSS mark and runs only the statistics pass. "Added" is that pass's peak RSS minus the RSS
at its start (on CUDA: peak allocated device memory minus allocated at its start), set against the memory of the
model's weights. Seconds are wall clock and process CPU time; on a machine shared with other work the CPU time is
the steadier of the two.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# (label, path, store) of every measured variant; the plain path has no store.
VARIANTS = (
    ("plain", "plain", "auto"),
    ("layerwise", "layerwise", "auto"),
    ("layerwise, memory store", "layerwise", "memory"),
)
GOALS = {"layerwise_added_vs_weights_max": 0.3, "plain_vs_layerwise_added_min": 3.0,
         "layerwise_vs_plain_seconds_max": 1.3}


def measure_step(
    model: str | None, path: str, store: str, samples: int, seq_len: int, layers: str | None, dtype: str,
    device: str | None, seed: int, calib: str | None = None,
) -> dict:
    """One statistics pass in this process (call it in a fresh one): memory added and seconds."""
    from ..data.text import calibration_source, calibration_windows
    from ..importance import collect_statistics
    from ..io import load_model
    from ..models import adapter_for
    from ..pruning import parse_layers

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    net, tokenizer = load_model(model, device=device, dtype=dtype)
    adapter = adapter_for(net)
    layer_indices = parse_layers(layers, len(adapter.layers()))
    _, passages = calibration_source(calib)
    batches = calibration_windows(tokenizer, passages, samples, seq_len, seed)
    unique = {p.data_ptr(): p for p in net.parameters()}.values()
    weights_mb = sum(p.numel() * p.element_size() for p in unique) / 2**20
    with torch.no_grad():
        for param in unique:
            param.sum()  # touch every page: a lazily mapped weight must not count as the pass's memory
    on_cuda = next(net.parameters()).device.type == "cuda"
    gc.collect()
    start = _memory_start(on_cuda)
    wall, cpu = time.perf_counter(), time.process_time()
    stats = collect_statistics(net, adapter, layer_indices, batches, gradients=True, activations=False,
                               progress=False, path=path, store=store)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _memory_peak(on_cuda)
    return {
        "path": path, "store": store, "samples": samples, "seq_len": seq_len, "seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2), "start_mb": round(start, 1), "peak_mb": round(peak, 1),
        "added_mb": round(peak - start, 1), "weights_mb": round(weights_mb, 1), "loss": stats.loss,
        "memory": "cuda allocated" if on_cuda else "RSS",
    }


def _memory_start(on_cuda: bool) -> float:
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak-RSS mark (VmHWM) restarts from the current RSS
    return _status_mb("VmRSS")


def _memory_peak(on_cuda: bool) -> float:
    if on_cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}: the cost benchmark measures RSS on Linux")


def _run_worker(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run([sys.executable, "-m", "hywia.bench.cost", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"cost worker failed ({spec}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cost(
    model: str | None = None,
    *,
    samples: int = 64,
    seq_len: int = 128,
    scale: int = 4,
    layers: str | None = None,
    dtype: str = "float32",
    device: str | None = None,
    seed: int = 0,
    calib: str | None = None,
    repeats: int = 1,
    progress: bool = True,
) -> dict:
    """Every variant at `samples` and at `scale` x `samples`, `repeats` rounds each (interleaved, so a busy spell
    of the machine does not fall on one path only); per setting the median seconds and the largest memory."""
    runs = []
    for count in (samples, samples * scale):
        for round_index in range(repeats if count == samples else 1):
            for label, path, store in VARIANTS:
                spec = dict(model=model, path=path, store=store, samples=count, seq_len=seq_len, layers=layers,
                            dtype=dtype, device=device, seed=seed, calib=calib)
                result = dict(_run_worker(spec), label=label, round=round_index)
                runs.append(result)
                if progress:
                    print(f"{label:<26} {count:>4} samples: +{result['added_mb']:.0f} MB, {result['seconds']:.1f} s "
                          f"wall, {result['cpu_seconds']:.1f} s CPU", file=sys.stderr)
    return {"model": model or "smollm2-135m", "dtype": dtype, "seq_len": seq_len, "layers": layers,
            "calib": calib or "LAMBADA passages", "summary": summarise(runs, samples), "runs": runs}


def summarise(runs: list[dict], samples: int) -> list[dict]:
    """One row per (variant, samples) with ratios against the weights and against the plain path."""
    rows = []
    for count in sorted({r["samples"] for r in runs}):
        group = {label: [r for r in runs if r["label"] == label and r["samples"] == count] for label, _, _ in VARIANTS}
        plain = _aggregate(group["plain"])
        for label, _, _ in VARIANTS:
            row = dict(_aggregate(group[label]), label=label, samples=count)
            row["added_vs_weights"] = round(row["added_mb"] / row["weights_mb"], 3)
            row["plain_vs_added"] = round(plain["added_mb"] / max(row["added_mb"], 1e-9), 2)
            row["seconds_vs_plain"] = round(row["seconds"] / plain["seconds"], 3)
            row["cpu_seconds_vs_plain"] = round(row["cpu_seconds"] / plain["cpu_seconds"], 3)
            rows.append(row)
    for row in rows:
        if row["label"] == "layerwise" and row["samples"] == samples:
            row["goals"] = {
                "added <= 0.3x weights": row["added_vs_weights"] <= GOALS["layerwise_added_vs_weights_max"],
                "plain adds >= 3x": row["plain_vs_added"] >= GOALS["plain_vs_layerwise_added_min"],
                "seconds <= 1.3x plain (wall)": row["seconds_vs_plain"] <= GOALS["layerwise_vs_plain_seconds_max"],
                "seconds <= 1.3x plain (CPU)": row["cpu_seconds_vs_plain"] <= GOALS["layerwise_vs_plain_seconds_max"],
            }
    return rows


def _aggregate(runs: list[dict]) -> dict:
    return {
        "added_mb": max(r["added_mb"] for r in runs),
        "weights_mb": runs[0]["weights_mb"],
        "seconds": round(statistics.median(r["seconds"] for r in runs), 2),
        "cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in runs), 2),
        "runs": len(runs),
    }


def render_markdown(result: dict) -> str:
    """The summary as a Markdown table, with the goals of the layerwise path at the default size."""
    memory = result["runs"][0]["memory"]
    lines = [
        f"Importance step (gradient statistics of the pruned layers) on {result['model']} ({result['dtype']}, "
        f"{result['seq_len']} tokens per sample, calibration: {result['calib']}): peak {memory} above the step's "
        f"start, and seconds. Weights: {result['summary'][0]['weights_mb']:.0f} MB. `layerwise` keeps per-sample "
        "tensors in its default store (on disk when computing on the CPU); `layerwise, memory store` keeps them in "
        "process memory.",
        "",
        "| path | samples | added MB | added / weights | plain added / added | seconds (wall) | wall / plain "
        "| seconds (CPU) | CPU / plain | runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["summary"]:
        lines.append(
            f"| {row['label']} | {row['samples']} | {row['added_mb']:.0f} | {row['added_vs_weights']:.2f} "
            f"| {row['plain_vs_added']:.1f} | {row['seconds']:.1f} | {row['seconds_vs_plain']:.2f} "
            f"| {row['cpu_seconds']:.1f} | {row['cpu_seconds_vs_plain']:.2f} | {row['runs']} |"
        )
    goals = next(row["goals"] for row in result["summary"] if "goals" in row)
    lines += ["", "Goals (layerwise path, default size): " + "; ".join(
        f"{name}: {'met' if met else 'NOT met'}" for name, met in goals.items())]
    if result.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cost.json").write_text(json.dumps(result, indent=1))
    (out_dir / "cost.md").write_text(render_markdown(result))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hywia bench --cost", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="as for `hywia prune` (default: smollm2-135m)")
    parser.add_argument("--calib", default=None, help=".txt or .jsonl (default: LAMBADA passages)")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--scale", type=int, default=4, help="also measure at this multiple of --calib-samples")
    parser.add_argument("--layers", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="rounds at the default size (median seconds)")
    parser.add_argument("--out-dir", default="benchmarks/results", help="folder for cost.json and cost.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = cost(args.model, samples=args.calib_samples, seq_len=args.seq_len, scale=args.scale, layers=args.layers,
                  dtype=args.dtype, device=args.device, seed=args.seed, calib=args.calib, repeats=args.repeats)
    write(result, Path(args.out_dir))
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(measure_step(**json.loads(sys.argv[2]))))
    else:
        sys.exit(main())
