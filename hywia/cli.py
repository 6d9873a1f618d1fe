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
                   help="hywia | fixed:A | taylor-element1 | taylor-element2 | taylor-vector | flap | wanda-sp | "
                        "magnitude | random")
    p.add_argument("--calib", default=None, help="built-in source (lambada, wiki) or a .txt/.jsonl file (field 'text') [lambada]")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layers", default=None, help="layers to prune as A:B (default: keep first ~10%% and last 2)")
    p.add_argument("--attention", choices=["heads", "kv"], default="heads",
                   help="remove query heads evenly per KV group, or whole KV groups")
    p.add_argument("--allocation", choices=["uniform", "global"], default="global",
                   help="same share per pruned layer, or rank the groups of all pruned layers together")
    p.add_argument("--compensate", choices=["none", "bias", "lstsq", "lstsq-cv"], default="lstsq",
                   help="fold what the removed groups wrote into a bias (FLAP) or refit kept columns by least squares "
                        "(lstsq-cv: ridge chosen on held-out calibration windows)")
    p.add_argument("--round-to", type=int, default=1, help="round kept MLP widths (and heads where possible) to N")
    p.add_argument("--importance-path", choices=["layerwise", "plain"], default="layerwise",
                   help="gradient statistics one layer at a time (little memory) or by full backward (same scores)")
    p.add_argument("--activation-store", choices=["auto", "memory", "disk"], default="auto",
                   help="where the layerwise path keeps per-sample layer inputs (auto: disk on CPU, else host memory)")
    p.add_argument("--offload", choices=["cpu", "disk"], default=None,
                   help="keep the decoder layers there and stream them through --device one at a time")
    p.add_argument("--device-map", default=None,
                   help="let accelerate place the model: auto | balanced | sequential | a JSON file of a device_map")
    p.add_argument("--offload-folder", default=None, help="folder for disk-offloaded weights (default: temporary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--ppl-text", default="lambada", help="held-out text for before/after perplexity, or 'none'")
    p.add_argument("--tune", action="store_true",
                   help="then LoRA-tune the pruned model: OUT/pruned holds it untuned, OUT/merged tuned, "
                        "OUT/report.json both perplexities; --tune-* flags as in `hywia tune`")
    _add_tune_flags(p, prefix="tune-")
    p.set_defaults(run=_prune)
    _add_eval_parser(commands)
    _add_bench_parser(commands)
    _add_tune_parser(commands)
    _add_export_parser(commands)
    return parser


def _limit(text: str) -> int | None:
    return None if text.lower() in ("none", "all") else int(text)


def _add_measure_flags(p: argparse.ArgumentParser, texts: str, limit: int | None) -> None:
    """Flags shared by `eval` and `bench`: what is measured, and on how much data."""
    p.add_argument("--ppl-text", action="append", default=None,
                   help=f"lambada | coqa | a .txt/.jsonl file; repeatable or comma list; 'none' to skip "
                        f"(default: {texts})")
    p.add_argument("--ppl-tokens", type=int, default=16384, help="tokens of each text for perplexity")
    p.add_argument("--seq-len", type=int, default=128, help="window length (non-overlapping windows)")
    p.add_argument("--tasks", default="all",
                   help="comma list of boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa | all | none")
    p.add_argument("--limit", type=_limit, default=limit,
                   help=f"items per task: a fixed subset chosen by --seed, or 'none' for the full splits "
                        f"(default: {limit or 'none'})")
    p.add_argument("--seed", type=int, default=0)


def _add_eval_parser(commands) -> None:
    p = commands.add_parser("eval", help="perplexity and zero-shot accuracy of a dense or pruned model")
    _add_model_flags(p)
    _add_measure_flags(p, "lambada", None)
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    p.add_argument("--out", default=None, help="write the full record as JSON to this file")
    p.set_defaults(run=_eval)


def _add_bench_parser(commands) -> None:
    from .bench import DEFAULT_CRITERIA, DEFAULT_LIMIT
    from .bench.speed import add_speed_flags

    p = commands.add_parser("bench", help="prune with several criteria and ratios, evaluate each side by side")
    _add_model_flags(p)
    p.add_argument("--ratios", default="0.2,0.5", help="comma list of ratios")
    p.add_argument("--criteria", default=",".join(DEFAULT_CRITERIA),
                   help="comma list; an entry may carry prune options: hywia@allocation=global@compensate=bias")
    p.add_argument("--prune-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra hywia.prune argument for every run (repeatable), e.g. allocation=global")
    p.add_argument("--calib", default=None, help="built-in source (lambada, wiki) or a .txt/.jsonl file (field 'text') [lambada]")
    p.add_argument("--calib-samples", type=int, default=64)
    _add_measure_flags(p, "lambada,coqa", DEFAULT_LIMIT)
    p.add_argument("--out-dir", default="bench", help="folder for bench.json, bench.md and the PNG plots")
    p.add_argument("--markdown", default=None, help="also write the table section into this file (BENCHMARKS.md)")
    p.add_argument("--speed", action="store_true",
                   help="instead: time the dense model against pruned copies (prefill, decode) on SmolLM2-135M and "
                        "a LLaMA-7B-shaped stack, each speed-up against its MAC ceiling; takes the --speed-* "
                        "flags, --seed and --out-dir (speed.json, speed.md)")
    add_speed_flags(p, prefix="speed-")
    p.add_argument("--cost", action="store_true",
                   help="instead: what the importance step costs, memory-light (layerwise) path against the plain "
                        "full backward, each in a fresh process: peak memory above the step's start (RSS; CUDA "
                        "memory on a GPU) and seconds, at --calib-samples and at --cost-scale times as many; takes "
                        "--model, --calib, --calib-samples, --seq-len, --dtype, --device, --seed and --out-dir "
                        "(cost.json, cost.md)")
    # None until given, so a quality run's recorded command does not spell out the cost benchmark's settings
    p.add_argument("--cost-scale", type=int, default=None, help="also measure at this multiple of --calib-samples (4)")
    p.add_argument("--cost-repeats", type=int, default=None, help="rounds at the default size, median seconds (1)")
    p.add_argument("--cost-layers", default=None, help="layers whose statistics are taken, as A:B (default as prune)")
    p.set_defaults(run=_bench, command_parser=p)


def _eval(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from .eval.api import evaluate, format_table

    result = evaluate(
        args.model, ppl_texts=args.ppl_text or ["lambada"], tasks=args.tasks, limit=args.limit, seed=args.seed,
        seq_len=args.seq_len, ppl_tokens=args.ppl_tokens, batch_size=args.batch_size, device=args.device,
        dtype=args.dtype,
    )
    print(format_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"saved to {args.out}")


def _bench(args: argparse.Namespace) -> None:
    if args.speed and args.cost:
        raise HywiaError("--speed and --cost are separate benchmarks: give one of them")
    if args.speed:
        _speed(args)
        return
    if args.cost:
        _cost(args)
        return
    from .bench import run
    from .bench.run import parse_option
    from .io import describe, load_model

    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError as exc:
        raise HywiaError(f"--ratios must be a comma list of numbers, got {args.ratios!r}") from exc
    options = dict(parse_option(pair) for pair in args.prune_option)
    args.ppl_text = args.ppl_text or ["lambada,coqa"]  # spelled out in the recorded command
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    run(
        model, tokenizer, ratios=ratios, criteria=args.criteria, tasks=args.tasks, limit=args.limit, seed=args.seed,
        ppl_texts=args.ppl_text, ppl_tokens=args.ppl_tokens, seq_len=args.seq_len,
        calib=args.calib, calib_samples=args.calib_samples, prune_kwargs=options, out_dir=args.out_dir,
        markdown=args.markdown, model_description=describe(args.model), command=_command_line(args),
    )


def _speed(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .bench.speed import command_line, render_markdown, run_speed, settings_from_args

    settings = settings_from_args(args)
    command = command_line(["hywia", "bench", "--speed"], settings, prefix="speed-",
                           extra=["--out-dir", args.out_dir])
    print(render_markdown(run_speed(settings, args.out_dir, command)))
    print(f"saved to {Path(args.out_dir) / 'speed.json'} and speed.md")


def _cost(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .bench.cost import cost, render_markdown, write

    scale = 4 if args.cost_scale is None else args.cost_scale
    repeats = 1 if args.cost_repeats is None else args.cost_repeats
    if min(scale, repeats, args.calib_samples) < 1:
        raise HywiaError("--calib-samples, --cost-scale and --cost-repeats must be >= 1")
    result = cost(args.model, samples=args.calib_samples, seq_len=args.seq_len, scale=scale, layers=args.cost_layers,
                  dtype=args.dtype, device=args.device, seed=args.seed, calib=args.calib, repeats=repeats)
    write(result, Path(args.out_dir))
    print(render_markdown(result))
    print(f"saved to {Path(args.out_dir) / 'cost.json'} and cost.md")


def _command_line(args: argparse.Namespace) -> str:
    """The command with every effective setting spelled out, defaults included, so it reproduces the run even
    after a default changes."""
    import shlex

    words = ["hywia", args.command]
    for action in args.command_parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest == "help" or value is False:
            continue
        if value is None:
            if action.default is None:
                continue
            value = "none"  # --limit none: an explicit None that differs from the default
        flag = action.option_strings[-1]
        for item in value if isinstance(value, list) else [value]:
            words += [flag] if item is True else [flag, str(item)]
    return shlex.join(words)


def _add_tune_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """LoRA settings of `hywia tune`, taken by `hywia prune --tune` as --tune-*. Flags left out keep the defaults of
    hywia.tune (in brackets), which stay defined in one place."""

    def flag(name: str, help: str, group=p, **kwargs) -> None:
        group.add_argument(f"--{prefix}{name}", dest=f"tune_{name.replace('-', '_')}", default=argparse.SUPPRESS,
                           metavar=name.rsplit("-", 1)[-1].upper(), help=help, **kwargs)

    flag("data", "Alpaca JSON/JSONL, chat JSONL ('messages' or 'conversations'), or 'sharegpt' "
                 "[the packaged ShareGPT conversations]")
    length = p.add_mutually_exclusive_group()
    flag("steps", "optimizer steps [one epoch]", length, type=int)
    flag("epochs", "passes over the data, instead of steps", length, type=float)
    flag("lr", "learning rate [2e-4]", type=float)
    flag("lora-r", "LoRA rank [8]", type=int)
    flag("lora-alpha", "LoRA scale numerator [16]", type=int)
    flag("lora-dropout", "[0.05]", type=float)
    flag("cutoff-len", "tokens per example; longer conversations are cut [256]", type=int)
    flag("max-records", "read only the first N usable conversations [all]", type=int)
    flag("batch-size", "examples per step and process [4]", type=int)
    flag("grad-accum", "gradient accumulation steps [1]", type=int)
    flag("save-steps", "checkpoint every N steps (and at the end) [200]", type=int)
    p.add_argument(f"--{prefix}no-gradient-checkpointing", dest="tune_gradient_checkpointing",
                   action="store_false", default=argparse.SUPPRESS,
                   help="keep activations instead of recomputing them: faster, more memory")


def _add_tune_parser(commands) -> None:
    p = commands.add_parser(
        "tune", help="recover a pruned model with LoRA on instruction data",
        description="LoRA on q,k,v,o,gate,up,down with transformers' Trainer, loss on responses only. Runs on the "
                    "GPU when one is visible; `accelerate launch -m hywia.cli tune ...` trains data-parallel.",
    )
    p.add_argument("--model", required=True, help="pruned model folder (or any local HF folder, hub name)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--out", required=True,
                   help="run folder: adapter/, checkpoints/, report.json, and merged/ with --merge")
    p.add_argument("--merge", action="store_true",
                   help="also save the model with the adapter folded in to OUT/merged, reloadable like a prune folder")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--force", action="store_true", help="delete OUT first if it exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl-text", default="lambada", help="held-out text for before/after perplexity, or 'none'")
    _add_tune_flags(p)
    p.set_defaults(run=_tune)


def _tune_options(args: argparse.Namespace) -> dict:
    """The --[tune-]* LoRA flags the user gave, as hywia.tune keywords."""
    return {key.removeprefix("tune_"): value for key, value in vars(args).items() if key.startswith("tune_")}


def _tune(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from .recovery.api import tune_model

    result = tune_model(
        args.model, out=args.out, merge=args.merge, resume=args.resume, force=args.force, seed=args.seed,
        dtype=args.dtype, ppl_text=None if args.ppl_text == "none" else args.ppl_text, **_tune_options(args),
    )
    if PartialState().is_main_process:
        print_tune_summary(result.report)
        print(f"saved to {args.out}: adapter/, checkpoints/, report.json" + (", merged/" if args.merge else ""))


def _prune(args: argparse.Namespace) -> None:
    from .api import prune

    tune_options = _tune_options(args)
    if tune_options and not args.tune:
        raise HywiaError("--tune-* flags need --tune")
    run = prune
    if args.tune:
        from functools import partial

        from .recovery.api import prune_and_tune

        run = partial(prune_and_tune, tune=tune_options)
    result = run(
        args.model, ratio=args.ratio, criterion=args.criterion, calib=args.calib, calib_samples=args.calib_samples,
        seq_len=args.seq_len, layers=args.layers, attention=args.attention, allocation=args.allocation,
        compensate=args.compensate, round_to=args.round_to, seed=args.seed, out=args.out,
        force=args.force, device=args.device, dtype=args.dtype, importance_path=args.importance_path,
        activation_store=args.activation_store, offload=args.offload, device_map=_device_map(args.device_map),
        offload_folder=args.offload_folder,
        ppl_text=None if args.ppl_text == "none" else args.ppl_text,
    )
    if args.tune:
        print_summary(result.report["base_report"])
        print_tune_summary(result.report)
        print(f"saved to {args.out}: merged/ (tuned), pruned/ (untuned), adapter/, checkpoints/, report.json")
        return
    print_summary(result.report)
    print(f"saved to {args.out}")


def _device_map(value: str | None) -> str | dict | None:
    """An accelerate strategy name as is, or the map stored in a .json file."""
    if value is None or not value.endswith(".json"):
        return value
    import json
    from pathlib import Path

    try:
        return json.loads(Path(value).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HywiaError(f"--device-map {value}: {exc}") from exc


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
    if report.get("fusion", {}).get("alpha_mean"):
        rows.append(("learned blend, mean alpha", ", ".join(
            f"{view} {weight:.3f}" for view, weight in report["fusion"]["alpha_mean"].items())))
    rows += [("seconds", f"{report['seconds']:.1f}"), ("peak RSS (MB)", f"{report['peak_rss_mb']:.0f}")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("per layer (heads / kv heads / MLP):",
          " ".join(f"{w['num_attention_heads']}/{w['num_key_value_heads']}/{w['intermediate_size']}"
                   for w in report["layers"]))
    if "ratio_note" in report:
        print("note:", report["ratio_note"])


def print_tune_summary(report: dict) -> None:
    resumed = f" (resumed from {report['resumed_from']})" if report["resumed_from"] else ""
    loss = "n/a" if report["final_loss"] is None else f"{report['final_loss']:.4f}"
    rows = [
        ("tuned model", report["model"]),
        ("data", f"{report['data']} ({report['examples']:,} examples)"),
        ("steps", f"{report['steps']}{resumed}"),
        ("final loss", loss),
    ]
    if report.get("ppl_before") is not None:
        rows.append((f"perplexity ({report['ppl_text']['text']}, {report['ppl_text']['tokens']} tokens)",
                     f"{report['ppl_before']:.2f} -> {report['ppl_after']:.2f} (tuned)"))
    rows += [("seconds", f"{report['seconds']:.1f}"), ("peak RSS (MB)", f"{report['peak_rss_mb']:.0f}")]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _add_export_parser(commands) -> None:
    from .io.gguf_export import OUTTYPES

    p = commands.add_parser("export", help="write a pruned (or dense) model as GGUF for llama.cpp, Ollama, LM Studio")
    p.add_argument("--model", default=None,
                   help="pruned HF folder, dense folder, hub name, or an embedded model (default: smollm2-135m)")
    p.add_argument("--gguf", required=True, help="output .gguf file")
    p.add_argument("--outtype", choices=list(OUTTYPES), default="f16",
                   help="tensor type of the weight matrices; vectors stay f32 (default: f16)")
    p.add_argument("--force", action="store_true", help="overwrite --gguf if it exists")
    p.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> None:
    from .io.gguf_export import export_gguf

    result = export_gguf(args.model, args.gguf, outtype=args.outtype, force=args.force)
    print(f"architecture {result.arch}, {result.tensors} tensors ({result.outtype}), tokenizer from "
          f"{result.tokenizer}, {result.file_bytes / 2**20:.1f} MiB")
    if result.unaligned_widths:
        print(f"note: MLP widths {result.unaligned_widths} are not multiples of 32: llama.cpp runs them on slower "
              "kernels (and keeps them f16 under q8_0); prune with --round-to 32 for deployment")
    print(f"saved to {result.path}")


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
