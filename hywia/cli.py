"""The `hywia` command: parses flags and calls the Python API; user errors print one line, exit code 2."""

from __future__ import annotations

import argparse
import sys

from .errors import HywiaError


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="local HF folder, hub name, or an embedded model (default: smollm2-135m)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hywia", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prune", help="score every head and MLP channel, remove the lowest, save the model")
    _add_model_flags(p)
    p.add_argument("--ratio", type=float, required=True,
                   help="share of all decoder-layer parameters to remove, in (0, 1)")
    p.add_argument("--criterion", default="hywia",
                   help="hywia | fixed:A | taylor-element1 | taylor-element2 | taylor-vector | wanda-sp | "
                        "magnitude | random")
    p.add_argument("--calib", default=None, help=".txt or .jsonl (field 'text'); default: LAMBADA passages")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layers", default=None, help="layers to prune as A:B (default: keep first ~10%% and last 2)")
    p.add_argument("--attention", choices=["heads", "kv"], default="heads",
                   help="remove query heads evenly per KV group, or whole KV groups")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--ppl-text", default="lambada", help="held-out text for before/after perplexity, or 'none'")
    p.set_defaults(run=_prune)
    return parser


def _prune(args: argparse.Namespace) -> None:
    from .api import prune

    result = prune(
        args.model, ratio=args.ratio, criterion=args.criterion, calib=args.calib, calib_samples=args.calib_samples,
        seq_len=args.seq_len, layers=args.layers, attention=args.attention, seed=args.seed, out=args.out,
        force=args.force, device=args.device, dtype=args.dtype,
        ppl_text=None if args.ppl_text == "none" else args.ppl_text,
    )
    print_summary(result.report)
    print(f"saved to {args.out}")


def print_summary(report: dict) -> None:
    rows = [
        ("model", report["model"]),
        ("criterion", report["criterion"]),
        ("ratio requested / achieved", f"{report['ratio_requested']:.3f} / {report['ratio_achieved']:.3f}"),
        ("params before -> after", f"{report['params_before']:,} -> {report['params_after']:,}"),
    ]
    if report.get("ppl_before") is not None:
        rows.append((f"perplexity ({report['ppl_text']['text']}, {report['ppl_text']['tokens']} tokens)",
                     f"{report['ppl_before']:.2f} -> {report['ppl_after']:.2f}"))
    if report.get("fusion", {}).get("alpha_fine_mean") is not None:
        rows.append(("learned blend, mean alpha_fine", f"{report['fusion']['alpha_fine_mean']:.3f}"))
    rows += [("seconds", f"{report['seconds']:.1f}"), ("peak RSS (MB)", f"{report['peak_rss_mb']:.0f}")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("per layer (heads / kv heads / MLP):",
          " ".join(f"{w['num_attention_heads']}/{w['num_key_value_heads']}/{w['intermediate_size']}"
                   for w in report["layers"]))
    if "ratio_note" in report:
        print("note:", report["ratio_note"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except HywiaError as exc:
        print(f"hywia: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
