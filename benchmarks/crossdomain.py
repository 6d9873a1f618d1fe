"""Cross-domain quality protocol: calibrate on one source, judge perplexity on texts of other genres.

Statistics are collected ONCE per calibration source (and sample count) and shared by every variant and ratio;
each variant's scores are computed once and shared by the variants that differ only in compensation. Every held-out
text is tokenized into the same non-overlapping windows for every variant. The calibration source's own held-out
part is one column, marked in-domain; `cross gm` is the geometric mean over every other text, the figure defaults are
chosen on. Rows are appended to the JSON and markdown as they finish, so an interrupted run keeps what it measured.

    nice -n 10 python benchmarks/crossdomain.py --calib lambada --ratios 0.2,0.5
    nice -n 10 python benchmarks/crossdomain.py --calib wiki --variants hywia,fluctuation --out benchmarks/results/x

A variant is `label` (one of VARIANTS) or `label=criterion/allocation/compensation` with a registered criterion.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from hywia.data.text import CALIBRATION_SOURCES, calibration_source, calibration_windows
from hywia.eval.perplexity import heldout_windows, perplexity
from hywia.importance import ScoringContext, collect_statistics, get_criterion
from hywia.importance.base import Criterion
from hywia.importance.fusion import HywiaFusion
from hywia.io import load_model
from hywia.models import adapter_for
from hywia.pruning import allocate_global, allocate_uniform, apply_plan, parse_layers, select
from hywia.pruning.compensate import compensate

TEXTS = "lambada,wiki,coqa,sciq,dialogue,pydoc"


@dataclass(frozen=True)
class Variant:
    """One prune: a criterion (registered name, or a factory below), an allocation and a compensation mode."""

    label: str
    criterion: str
    allocation: str
    compensation: str

    def make(self) -> Criterion:
        factory = CRITERION_FACTORIES.get(self.criterion)
        return factory() if factory else get_criterion(self.criterion)


# Criteria that need constructor arguments the registry's `name:arg` form cannot pass.
CRITERION_FACTORIES: dict[str, Callable[[], Criterion]] = {
    "hywia-equal": partial(HywiaFusion, steps=0),
    "hywia-validated": partial(HywiaFusion, validation_share=0.25),
}

# hywia's default; its three views and a fixed blend under the same allocation and compensation; the peers at their
# own recipes (FLAP: global + bias; LLM-Pruner element1 and Wanda-sp: uniform, none) and under hywia's.
VARIANTS = {v.label: v for v in [
    Variant("hywia", "hywia", "global", "lstsq"),
    Variant("hywia-equal", "hywia-equal", "global", "lstsq"),
    Variant("fine", "taylor-element1", "global", "lstsq"),
    Variant("coarse", "taylor-vector", "global", "lstsq"),
    Variant("fluctuation", "flap", "global", "lstsq"),
    Variant("fixed:0.5", "fixed:0.5", "global", "lstsq"),
    Variant("wanda-sp/global/lstsq", "wanda-sp", "global", "lstsq"),
    Variant("hywia/bias", "hywia", "global", "bias"),
    Variant("FLAP recipe", "flap", "global", "bias"),
    Variant("LLM-Pruner e1 recipe", "taylor-element1", "uniform", "none"),
    Variant("Wanda-sp recipe", "wanda-sp", "uniform", "none"),
    # Questions of issue 17: a blend checked on held-out calibration windows; the least-squares ridge chosen on them.
    Variant("hywia-validated", "hywia-validated", "global", "lstsq"),
    Variant("hywia/lstsq-cv", "hywia", "global", "lstsq-cv"),
    Variant("fine/lstsq-cv", "taylor-element1", "global", "lstsq-cv"),
    Variant("fluctuation/lstsq-cv", "flap", "global", "lstsq-cv"),
]}
DEFAULT_VARIANTS = ",".join(VARIANTS)


def parse_variant(spec: str) -> Variant:
    if spec in VARIANTS:
        return VARIANTS[spec]
    label, _, recipe = spec.partition("=")
    criterion, allocation, compensation = recipe.split("/")
    return Variant(label, criterion, allocation, compensation)


# --- pipeline internals: the only place this script reaches past `hywia.prune` (keep it small, easy to port) ---
def score_plan(model, adapter, layers: list[int], batches: torch.Tensor, stats, ratio: float, variant: Variant):
    """(plan, criterion summary) of one variant from shared statistics, as `hywia.prune` would choose it."""
    specs = {i: adapter.group_specs(adapter.layers()[i]) for i in layers}
    keep = allocate_uniform(adapter, layers, ratio)
    allocate = partial(allocate_global, adapter, layers, ratio) if variant.allocation == "global" else None
    scorer = variant.make()
    ctx = ScoringContext(model, adapter, layers, specs, batches, keep, 0, stats, False, allocate,
                         variant.compensation)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        scores = scorer.score(ctx)
    return select(adapter, scores, allocate(scores) if allocate else keep), scorer.summary()


def cut(model, plan, batches: torch.Tensor, compensation: str):
    """(a pruned copy of the dense model, each projection's fit): compensation on the calibration windows, then
    surgery."""
    pruned = copy.deepcopy(model)
    fits = compensate(pruned, adapter_for(pruned), plan, batches, compensation) if compensation != "none" else {}
    apply_plan(pruned, plan)
    return pruned, fits
# --- end of pipeline internals ---


def ngram_overlap(calibration: torch.Tensor, heldout: torch.Tensor, n: int = 13) -> float:
    """Share of the held-out windows' token n-grams that also occur in the calibration windows (0 = disjoint)."""
    def grams(windows: torch.Tensor) -> list[tuple[int, ...]]:
        return [tuple(row[i:i + n].tolist()) for row in windows for i in range(1, row.numel() - n + 1)]

    seen = set(grams(calibration))
    held = grams(heldout)
    return sum(g in seen for g in held) / max(len(held), 1)


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--calib", default="lambada", choices=sorted(CALIBRATION_SOURCES))
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma list (see module docstring)")
    parser.add_argument("--texts", default=TEXTS)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="path stem of the JSON + markdown [benchmarks/results/"
                                                    "crossdomain-<calib>-<samples>]")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or f"benchmarks/results/crossdomain-{args.calib}-{args.calib_samples}")
    variants = [parse_variant(v) for v in args.variants.split(",")]

    model, tokenizer = load_model(args.model)
    adapter = adapter_for(model)
    layers = parse_layers(None, len(adapter.layers()))
    calib_description, passages = calibration_source(args.calib)
    batches = calibration_windows(tokenizer, passages, args.calib_samples, args.seq_len, 0)
    texts = {name: heldout_windows(tokenizer, name, args.seq_len, args.eval_tokens) for name in args.texts.split(",")}
    in_domain = args.calib if args.calib in texts else None
    meta = {
        "command": "python benchmarks/crossdomain.py " + " ".join(
            f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in vars(args).items()
            if v is not None and k != "threads"),
        "model": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF dequantised to float32; Instruct variant)",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), shared 2-core CPU",
        "calibration": f"{args.calib_samples} x {args.seq_len} tokens of {calib_description}, seed 0",
        "in_domain": in_domain,
        "texts": {name: {"description": desc, "tokens": int(w.numel()),
                         "calibration_13gram_overlap": round(ngram_overlap(batches, w), 4)}
                  for name, (desc, w) in texts.items()},
        "layers_pruned": f"{layers[0]}..{layers[-1]}",
    }
    started = time.perf_counter()
    stats = collect_statistics(model, adapter, layers, batches, progress=False)
    meta["statistics_seconds"] = round(time.perf_counter() - started, 1)
    rows = [_row(0.0, "dense", None, {n: perplexity(model, w) for n, (_, w) in texts.items()}, in_domain, 0.0, {})]
    _report(out, meta, rows, list(texts))
    plans: dict[tuple, tuple] = {}
    # Variant by variant (in the order given, both ratios each), so an interrupted run keeps the first variants whole.
    for variant in variants:
        for ratio in (float(r) for r in args.ratios.split(",")):
            started = time.perf_counter()
            # Only the fusion's scores depend on the compensation: whether its gates put a closed group's mean in place.
            key = (ratio, variant.criterion, variant.allocation,
                   variant.compensation == "none" if isinstance(variant.make(), HywiaFusion) else None)
            if key not in plans:
                plans[key] = score_plan(model, adapter, layers, batches, stats, ratio, variant)
            plan, summary = plans[key]
            pruned, fits = cut(model, plan, batches, variant.compensation)
            seconds = time.perf_counter() - started
            ppl = {n: perplexity(pruned, w) for n, (_, w) in texts.items()}
            summary = {**summary, "compensation_fits": dict(Counter(fits.values()))}
            rows.append(_row(ratio, variant.label, variant, ppl, in_domain, seconds, summary))
            del pruned
            _report(out, meta, rows, list(texts))


def _row(ratio: float, label: str, variant: Variant | None, ppl: dict[str, float], in_domain: str | None,
         seconds: float, summary: dict) -> dict:
    cross = [v for n, v in ppl.items() if n != in_domain]
    row = {"ratio": ratio, "variant": label,
           "recipe": f"{variant.criterion}/{variant.allocation}/{variant.compensation}" if variant else "-",
           "ppl": ppl, "cross_gm": geometric_mean(cross), "seconds": round(seconds, 1), "summary": summary}
    print(f"{ratio:.2f} {label:>24}  " + "  ".join(f"{n} {v:9.2f}" for n, v in ppl.items()) +
          f"  cross-gm {row['cross_gm']:9.2f}  {seconds:6.1f}s", flush=True)
    return row


def _report(out: Path, meta: dict, rows: list[dict], texts: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(_markdown(meta, rows, texts))


def _markdown(meta: dict, rows: list[dict], texts: list[str]) -> str:
    in_domain = meta["in_domain"]
    header = [f"{t} (in-domain)" if t == in_domain else t for t in texts]
    lines = [
        f"Command: `{meta['command']}`", "",
        f"Model: {meta['model']}. Machine: {meta['machine']}. Calibration: {meta['calibration']} "
        f"(statistics once: {meta.get('statistics_seconds', '-')} s). Pruned layers {meta['layers_pruned']}. "
        "Perplexity over non-overlapping 128-token windows of: " + "; ".join(
            f"{n} = {v['description']}, {v['tokens']} tokens ({100 * v['calibration_13gram_overlap']:.1f}% of its "
            "13-grams in the calibration windows)" for n, v in meta["texts"].items()) +
        f". cross gm = geometric mean over every text but the in-domain one. seconds = scoring + compensation + "
        "surgery of that row (scores shared between rows that differ only in compensation are counted once).",
        "", "| ratio | variant | recipe | " + " | ".join(header) + " | cross gm | seconds |",
        "|---|---|---|" + "---|" * len(texts) + "---|---|"]
    for row in sorted(rows, key=lambda r: r["ratio"]):
        ppl = " | ".join(f"{row['ppl'][t]:.2f}" for t in texts)
        lines.append(f"| {row['ratio']:.1f} | {row['variant']} | {row['recipe']} | {ppl} | "
                     f"**{row['cross_gm']:.2f}** | {row['seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
