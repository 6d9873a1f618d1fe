"""Quality ablation on the embedded model: criterion x allocation x compensation at several ratios.

One `hywia.pipeline.Pipeline` collects the statistics once and prunes a copy of the model per variant (the same
calibration windows `hywia prune` uses with the same seed and sample count), so each row equals
`hywia prune --criterion C --allocation A --compensate M`. A variant's parts may carry settings
(`hywia:steps=48/global:floor=0.1/lstsq:ridge=0.001`).
Held-out perplexity on two texts of different genres. Prints a table, writes JSON and a markdown fragment.

    python benchmarks/ablation.py --ratios 0.2,0.5 --variants taylor-element1/uniform/none,hywia/global/lstsq
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from hywia.eval.perplexity import heldout_windows, perplexity
from hywia.io import load_model
from hywia.pipeline import Pipeline
from hywia.settings import CalibrationConfig, PruneConfig

# The peers at their own recipes (LLM-Pruner's three criteria and Wanda-sp: uniform, no compensation; FLAP: global
# allocation with heads and channels ranked alike, bias compensation), then the fusion's ablation through hywia's own
# pipeline (global, lstsq).
PEERS = ("taylor-element1/uniform/none,taylor-element2/uniform/none,taylor-vector/uniform/none,"
         "wanda-sp/uniform/none,flap/global:attention_weight=1/bias")
ABLATION = "taylor-element1/global/lstsq,taylor-vector/global/lstsq,fixed:0.5/global/lstsq,flap/global/lstsq"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--variants", default=f"{PEERS},{ABLATION},hywia/global/lstsq",
                        help="comma list of criterion/allocation/compensation")
    parser.add_argument("--texts", default="lambada,coqa")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/ablation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    calibration = CalibrationConfig(calib="lambada", calib_samples=args.calib_samples, seq_len=args.seq_len)
    pipeline = Pipeline(model, tokenizer, calibration=calibration, progress=False)
    layers = pipeline.layer_indices
    texts = {name: heldout_windows(tokenizer, name, args.seq_len, args.eval_tokens) for name in args.texts.split(",")}
    runs = [pipeline.prepare(PruneConfig(ratio=float(ratio), criterion=criterion, allocation=allocation,
                                         compensate=mode))
            for ratio in args.ratios.split(",") for criterion, allocation, mode in
            (variant.split("/") for variant in args.variants.split(","))]
    pipeline.calibrate(runs)
    stats_seconds = pipeline.log.stages["calibrate"]["seconds"]
    rows = [{"ratio": 0.0, "criterion": "dense", "allocation": "-", "compensate": "-",
             "ppl": {name: perplexity(model, w) for name, (_, w) in texts.items()}, "seconds": 0.0}]
    print(_format(rows[-1]), flush=True)
    for run in runs:
        before = pipeline.log.seconds()
        pruned = pipeline.run(run, in_place=False)
        config = run.config
        rows.append({
            "ratio": config.ratio, "criterion": config.criterion, "allocation": config.allocation,
            "compensate": config.compensate,
            "ppl": {name: perplexity(pruned.model, w) for name, (_, w) in texts.items()},
            "seconds": round(pipeline.log.seconds() - before + stats_seconds, 1),
            "widths": pruned.model.config.hywia_layers,
            "fusion": run.criterion.summary(),
        })
        print(_format(rows[-1]), flush=True)
        del pruned
    meta = {
        "model": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF dequantised to float32; Instruct variant)",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), shared 2-core CPU",
        "calibration": f"{args.calib_samples} x {args.seq_len} tokens of LAMBADA calibration passages, seed 0",
        "texts": {name: {"description": desc, "tokens": int(w.numel())} for name, (desc, w) in texts.items()},
        "layers_pruned": f"{layers[0]}..{layers[-1]}",
        "statistics_seconds": round(stats_seconds, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(_markdown(meta, rows, list(texts)))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def _format(row: dict) -> str:
    ppl = "  ".join(f"{name} {value:9.2f}" for name, value in row["ppl"].items())
    return f"{row['ratio']:.2f} {row['criterion']:>16} {row['allocation']:>8} {row['compensate']:>6}  {ppl}"


def _markdown(meta: dict, rows: list[dict], texts: list[str]) -> str:
    lines = [f"Model: {meta['model']}. Machine: {meta['machine']}. Calibration: {meta['calibration']}. "
             f"Pruned layers {meta['layers_pruned']}. Perplexity: " +
             "; ".join(f"{n} = {v['description']}, {v['tokens']} tokens" for n, v in meta["texts"].items()) + ".",
             "", "| ratio | criterion | allocation | compensation | " + " | ".join(f"ppl {t}" for t in texts) +
             " | seconds |", "|---|---|---|---|" + "---|" * len(texts) + "---|"]
    for row in rows:
        ppl = " | ".join(f"{row['ppl'][t]:.2f}" for t in texts)
        lines.append(f"| {row['ratio']:.1f} | {row['criterion']} | {row['allocation']} | {row['compensate']} | "
                     f"{ppl} | {row['seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
