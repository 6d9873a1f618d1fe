"""The `hywia` command: parses flags and calls the Python API; user errors print one line, exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from .errors import HywiaError
from .settings import CalibrationConfig, EvalConfig, PruneConfig, RuntimeConfig, describe_specs, flat_fields


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="local HF folder, hub name, or an embedded model (default: smollm2-135m)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")


def _add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code shipped in the model folder (only for a model you trust)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hywia", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prune", help="score every head and MLP channel, remove the lowest, save the model")
    p.add_argument("--model", default=argparse.SUPPRESS,
                   help="local HF folder, hub name, or an embedded model (default: the recipe's, else smollm2-135m)")
    p.add_argument("--recipe", default=None,
                   help="re-run a saved recipe (OUT/recipe.json or report.json of an earlier prune); flags given "
                        "here override it")
    _add_settings_flags(p, [PruneConfig, CalibrationConfig, RuntimeConfig, EvalConfig])
    _add_trust_flag(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--tune", action="store_true",
                   help="then LoRA-tune the pruned model: OUT/pruned holds it untuned, OUT/merged tuned, "
                        "OUT/report.json both perplexities; --tune-* flags as in `hywia tune`")
    _add_tune_flags(p, prefix="tune-")
    p.set_defaults(run=_prune)
    _add_eval_parser(commands)
    _add_bench_parser(commands)
    _add_tune_parser(commands)
    _add_export_parser(commands)
    _add_apply_parser(commands)
    return parser


def _add_settings_flags(p: argparse.ArgumentParser, configs: list[type]) -> None:
    """One flag per field of the settings dataclasses (hywia.settings), its help from the field. Flags left out are
    absent from the parsed namespace, so a --recipe's values (or the dataclass defaults) stand."""
    from .importance.base import criterion_settings
    from .pruning.methods import ALLOCATIONS, COMPENSATIONS

    specs = {"criterion": criterion_settings(), "allocation": ALLOCATIONS, "compensate": COMPENSATIONS}
    for config in configs:
        for item in dataclasses.fields(config):
            text = item.metadata["help"]
            if item.name in specs:
                text += f": {describe_specs(specs[item.name])}".replace("%", "%%")
            if item.name == "ratio":
                text += " (required)"
            elif "default" not in text and item.default is not None:
                text += f" (default: {item.default})"
            p.add_argument(f"--{item.name.replace('_', '-')}", dest=item.name, default=argparse.SUPPRESS,
                           choices=item.metadata.get("choices"), help=text)


def _settings(args: argparse.Namespace) -> dict:
    """The settings flags the user gave, by field name (values converted and checked by hywia.settings)."""
    given = {name: value for name, value in vars(args).items() if name in flat_fields() or name == "model"}
    if "device_map" in given:
        given["device_map"] = _device_map(given["device_map"])
    return given


def _add_apply_parser(commands) -> None:
    p = commands.add_parser(
        "apply", help="cut a dense model to a saved plan.json (no scoring), with the compensation its recipe records",
        description="Compensation (bias, lstsq) is refitted on the calibration windows the recipe records, so the "
                    "result equals the original prune's weights on the same machine.")
    p.add_argument("--plan", required=True, help="plan.json of an earlier prune")
    p.add_argument("--model", default=argparse.SUPPRESS, help="the dense model (default: the recipe's)")
    p.add_argument("--recipe", default=None, help="recipe of the prune (default: recipe.json beside --plan)")
    p.add_argument("--compensate", default=argparse.SUPPRESS, help="override the recipe's compensation")
    _add_settings_flags(p, [CalibrationConfig, RuntimeConfig])
    _add_trust_flag(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(run=_apply)


def _apply(args: argparse.Namespace) -> None:
    from .api import apply

    settings = _settings(args)
    model = settings.pop("model", None)
    result = apply(args.plan, model, recipe=args.recipe, out=args.out, force=args.force,
                   trust_remote_code=args.trust_remote_code, **settings)
    print(f"cut to {args.plan} ({result.report['compensate']} compensation): "
          f"{result.report['params_after']:,} parameters")
    print(f"saved to {args.out}")


def _limit(text: str) -> int | None:
    return None if text.lower() in ("none", "all") else int(text)


def _add_measure_flags(p: argparse.ArgumentParser, texts: str, limit: int | None) -> None:
    """Flags shared by `eval` and `bench`: what is measured, and on how much data."""
    p.add_argument("--ppl-text", action="append", default=None,
                   help=f"lambada | coqa | a .txt/.jsonl/.json file; repeatable or comma list; 'none' to skip "
                        f"(default: {texts})")
    p.add_argument("--ppl-tokens", type=int, default=16384, help="tokens of each text for perplexity")
    p.add_argument("--seq-len", type=int, default=128, help="window length (non-overlapping windows)")
    p.add_argument("--tasks", default="all",
                   help="comma list of tasks (boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,"
                        "lambada) and sets: paper = the first seven, separating = piqa,hellaswag,arc_easy,lambada, "
                        "all = both | none")
    p.add_argument("--limit", type=_limit, default=limit,
                   help=f"items per task: a fixed subset chosen by --seed, or 'none' for the full splits "
                        f"(default: {limit or 'none'})")
    p.add_argument("--seed", type=int, default=0)


def _add_eval_parser(commands) -> None:
    p = commands.add_parser("eval", help="perplexity and zero-shot accuracy of a dense or pruned model")
    _add_model_flags(p)
    _add_trust_flag(p)
    _add_measure_flags(p, "lambada", None)
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    p.add_argument("--out", default=None, help="write the full record as JSON to this file")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(run=_eval)


def _add_bench_parser(commands) -> None:
    from .bench import CROSS_DOMAIN_TEXTS, DEFAULT_CRITERIA, DEFAULT_LIMIT
    from .data.text import DEFAULT_CALIBRATION

    p = commands.add_parser("bench", help="prune with several criteria and ratios, evaluate each side by side")
    _add_model_flags(p)
    p.add_argument("--ratios", default="0.2,0.5", help="comma list of ratios")
    p.add_argument("--criteria", default=",".join(DEFAULT_CRITERIA),
                   help="comma list; an entry may carry prune options: hywia:steps=48@allocation=global:floor=0.1"
                        "@compensate=bias")
    p.add_argument("--prune-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra hywia.prune argument for every run (repeatable), e.g. allocation=global")
    p.add_argument("--calib", default=DEFAULT_CALIBRATION,
                   help="built-in source (mix, lambada, wiki; self: the model's own samples) or a UTF-8 .txt, .jsonl "
                        "(field 'text') or .json file "
                        f"[{DEFAULT_CALIBRATION}]")
    p.add_argument("--calib-samples", type=int, default=64)
    _add_measure_flags(p, CROSS_DOMAIN_TEXTS, DEFAULT_LIMIT)
    p.add_argument("--out-dir", default="bench", help="folder for bench.json, bench.md and the PNG plots")
    p.add_argument("--markdown", default=None, help="also write the table section into this file (BENCHMARKS.md)")
    p.set_defaults(run=_bench, command_parser=p)


def _eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .eval.api import evaluate, format_table
    from .io import check_output, local_path, write_text_atomic
    from .io.checks import strict_json

    if args.out:
        texts = [name for entry in args.ppl_text or [] for name in entry.split(",")]
        inputs = {"--model": local_path(args.model), **{f"--ppl-text {name}": local_path(name) for name in texts}}
        check_output(Path(args.out), args.force, inputs=inputs, file=True)
    result = evaluate(
        args.model, ppl_texts=args.ppl_text or ["lambada"], tasks=args.tasks, limit=args.limit, seed=args.seed,
        seq_len=args.seq_len, ppl_tokens=args.ppl_tokens, batch_size=args.batch_size, device=args.device,
        dtype=args.dtype, trust_remote_code=args.trust_remote_code,
    )
    print(format_table(result))
    if args.out:
        write_text_atomic(Path(args.out), strict_json(result, indent=1))
        print(f"saved to {args.out}")


def _bench(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .bench import CROSS_DOMAIN_TEXTS, run
    from .bench.run import parse_option

    from .io import check_output, describe, load_model, local_path

    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError as exc:
        raise HywiaError(f"--ratios must be a comma list of numbers, got {args.ratios!r}") from exc
    options = dict(parse_option(pair) for pair in args.prune_option)
    args.ppl_text = args.ppl_text or [CROSS_DOMAIN_TEXTS]  # spelled out in the recorded command
    inputs = {"--model": local_path(args.model), "--calib": local_path(args.calib)}
    check_output(Path(args.out_dir), inputs=inputs, existing_ok=True)  # a bench run refreshes its own folder
    if args.markdown:
        check_output(Path(args.markdown), inputs=inputs, file=True, existing_ok=True)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    run(
        model, tokenizer, ratios=ratios, criteria=args.criteria, tasks=args.tasks, limit=args.limit, seed=args.seed,
        ppl_texts=args.ppl_text, ppl_tokens=args.ppl_tokens, seq_len=args.seq_len,
        calib=args.calib, calib_samples=args.calib_samples, prune_kwargs=options, out_dir=args.out_dir,
        markdown=args.markdown, model_description=describe(args.model), command=_command_line(args),
    )


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
    _add_trust_flag(p)
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
        dtype=args.dtype, ppl_text=None if args.ppl_text == "none" else args.ppl_text,
        trust_remote_code=args.trust_remote_code, **_tune_options(args),
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
    settings = _settings(args)
    result = run(settings.pop("model", None), recipe=args.recipe, out=args.out, force=args.force,
                 trust_remote_code=args.trust_remote_code, **settings)
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
        steps = report["fusion"].get("steps")
        how = f"learned in {steps} steps" if steps else "equal, not learned"
        how += ", cross-fitted" if report["fusion"].get("crossfit") else ""
        rows.append((f"blend, mean alpha ({how})", ", ".join(
            f"{view} {weight:.3f}" for view, weight in report["fusion"]["alpha_mean"].items())))
    if report.get("fusion", {}).get("held_out_loss"):
        fusion = report["fusion"]
        losses = ", ".join(f"{name} {loss:.4f}" for name, loss in fusion["held_out_loss"].items())
        rows.append((f"kept (held-out LM loss, {fusion['held_out_windows']} windows)", f"{fusion['choice']}: {losses}"))
    rows += [("seconds", f"{report['seconds']:.1f}"), ("peak RSS (MB)", f"{report['peak_rss_mb']:.0f}")]
    if report.get("stages"):
        rows.append(("stages: seconds / peak RSS MB", ", ".join(
            f"{name} {entry['seconds']:.1f}/{entry['peak_rss_mb']:.0f}" for name, entry in report["stages"].items())))
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
    _add_trust_flag(p)
    p.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> None:
    from .io.gguf_export import export_gguf

    result = export_gguf(args.model, args.gguf, outtype=args.outtype, force=args.force,
                         trust_remote_code=args.trust_remote_code)
    print(f"architecture {result.arch}, {result.tensors} tensors ({result.outtype}), tokenizer from "
          f"{result.tokenizer}, {result.file_bytes / 2**20:.1f} MiB")
    if result.unaligned_widths:
        print(f"note: MLP widths {result.unaligned_widths} are not multiples of 32: llama.cpp runs them on slower "
              "kernels (and keeps them f16 under q8_0); prune with --round-to 32 for deployment")
    print(f"saved to {result.path}")


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived: raised where the program is, so that every `finally` and context manager on the
    way out removes its temporary files. Not an Exception, so no `except Exception` stops the unwinding."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame) -> None:
    for ignored in STOP_SIGNALS:  # a second signal must not cut the cleanup short
        signal.signal(ignored, signal.SIG_IGN)
    raise Stopped(signum)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def _stopping_on_signals() -> Iterator[None]:
    """SIGTERM (timeout, Slurm, docker stop) and SIGINT raise `Stopped` for the length of the command."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _remove_stale_temporaries(args: argparse.Namespace) -> None:
    """Temporaries of hywia runs that were killed outright, in the temporary folder and beside this run's output."""
    from pathlib import Path

    from .io.tempfiles import sweep_stale

    outputs = [Path(value) for value in (getattr(args, "out", None), getattr(args, "gguf", None)) if value]
    removed, freed = sweep_stale(outputs)
    if removed:
        print(f"hywia: removed {len(removed)} temporary file(s) of ended hywia runs ({freed / 2**20:.1f} MiB): "
              + ", ".join(str(path) for path in removed), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Its temporary folders (disk-offloaded weights included) are removed when it ends."""
    from .io.tempfiles import removing_created

    args = build_parser().parse_args(argv)
    try:
        with _stopping_on_signals(), removing_created():
            _remove_stale_temporaries(args)
            args.run(args)
    except HywiaError as exc:
        print(f"hywia: error: {exc}", file=sys.stderr)
        return 2
    except Stopped as stop:
        print(f"hywia: stopped by {signal.Signals(stop.signum).name}; its temporary files are removed",
              file=sys.stderr)
        return 128 + stop.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
