"""LoRA recovery of a pruned model with peft + transformers' Trainer.

Pruned layers keep their own widths (nn.Linear modules of different shapes per layer); peft sizes every LoRA pair
from the module it wraps, so heterogeneous models need nothing special. Which modules are adapted is the family's
knowledge: its adapter's `lora_targets`. Training goes through ``Trainer`` so
``accelerate launch`` brings data parallelism or FSDP without code changes, and its checkpoints (adapter weights as
safetensors, optimizer, scheduler, RNG, step) make ``resume=True`` continue from the last saved step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import (
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from hywia.models import adapter_for
from hywia.recovery.data import IGNORE_INDEX, Example


def tune(
    model: PreTrainedModel,
    tokenizer: Any,
    examples: Sequence[Example],
    out_dir: str | Path,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    lr: float = 2e-4,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    batch_size: int = 4,
    grad_accum: int = 1,
    gradient_checkpointing: bool = True,
    resume: bool = False,
    seed: int = 0,
    save_steps: int = 200,
    save_total_limit: int | None = 2,
    warmup_steps: int = 0,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict[str, Any]:
    """Train LoRA adapters on the family's projections (its adapter's ``lora_targets``); save them to
    ``out_dir/adapter``.

    Give ``steps`` or ``epochs`` (one epoch when neither). Checkpoints go to ``out_dir/checkpoints`` every
    ``save_steps`` optimizer steps and at the end (the newest ``save_total_limit`` kept). ``resume=True`` continues
    from the newest checkpoint (a fresh start when there is none yet); a resumed run asked for more steps than
    before follows the learning-rate schedule of the new total from the checkpoint's step on. ``callbacks`` replace
    Trainer's printing of raw log dicts, so a caller can report progress its own way.

    Returns the trained PeftModel under "model" (pass it to :func:`merge`), the global step reached ("steps"),
    the step training resumed from ("resumed_from", 0 for a fresh run), the last logged loss ("final_loss"),
    every logged step loss ("loss_history") and "adapter_dir".
    """
    if steps is not None and epochs is not None:
        raise ValueError("give either steps or epochs, not both")
    if not examples:
        raise ValueError("no training examples")
    if isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError("the model already carries LoRA layers; pass the base model (or merge() first)")
    targets = list(adapter_for(model).lora_targets)

    out_dir = Path(out_dir)
    checkpoint_dir = out_dir / "checkpoints"
    last_checkpoint = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    if last_checkpoint and not resume:
        raise ValueError(f"{checkpoint_dir} already holds checkpoints; pass resume=True or use another out_dir")
    resumed_from = 0
    if resume and last_checkpoint:
        resumed_from = TrainerState.load_from_json(str(Path(last_checkpoint) / "trainer_state.json")).global_step

    # Seeded before peft draws the LoRA A matrices, so runs with one seed start from identical adapters.
    set_seed(seed)
    lora = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    use_cache = model.config.use_cache
    peft_model = get_peft_model(model, lora)
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=steps if steps is not None else -1,
        num_train_epochs=epochs if epochs is not None else 1.0,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=lr,
        warmup_steps=warmup_steps,
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        activation_checkpointing=gradient_checkpointing,
        seed=seed,
        data_seed=seed,
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    with _right_padding(tokenizer):
        trainer = Trainer(
            model=peft_model,
            args=args,
            train_dataset=list(examples),
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
            callbacks=list(callbacks) or None,
        )
        if callbacks:
            trainer.remove_callback(PrinterCallback)
        trainer.train(resume_from_checkpoint=last_checkpoint if resume else None)
    trainer.save_model(str(out_dir / "adapter"))
    _back_to_inference(peft_model, gradient_checkpointing, use_cache)

    history = [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]
    return {
        "model": peft_model,
        "steps": trainer.state.global_step,
        "resumed_from": resumed_from,
        "final_loss": history[-1]["loss"] if history else None,
        "loss_history": history,
        "adapter_dir": str(out_dir / "adapter"),
    }


@contextlib.contextmanager
def _right_padding(tokenizer: Any) -> Iterator[None]:
    """Pad on the right while training: LLaMA-style models derive positions from the sequence index, so left
    padding would shift every position. Borrows EOS as the pad token when the tokenizer has none."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "right"
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def _back_to_inference(peft_model: PeftModel, gradient_checkpointing: bool, use_cache: bool) -> None:
    """Undo the training set-up Trainer leaves behind: checkpointing, the embedding hook that forces input grads
    (it would build autograd graphs in every later forward), the disabled KV cache, train mode."""
    base = peft_model.get_base_model()
    if gradient_checkpointing:
        base.activation_checkpointing_disable()
        base.disable_input_require_grads()
    base.config.use_cache = use_cache
    peft_model.eval()


def merge(peft_model: PeftModel) -> PreTrainedModel:
    """The base model with the LoRA deltas folded into its weights (same per-layer shapes, no peft modules left).

    Parameters are made trainable again: freezing was only for LoRA training, and later pruning rounds need grads.
    """
    merged = peft_model.merge_and_unload()
    merged.requires_grad_(True)
    return merged.eval()


def load_adapter(model: PreTrainedModel, adapter_dir: str | Path) -> PeftModel:
    """Attach a saved adapter to a freshly loaded (pruned) base model, for evaluation or :func:`merge`."""
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()

