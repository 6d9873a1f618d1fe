"""A LLaMA-7B-shaped model (32 layers, hidden 4096, MLP 11008, 32 heads, vocab 32000; random bf16 weights) pruned
end to end by the default `hywia prune` on this machine: writes benchmarks/results/llama7b_shape.json and .md.

Nothing is downloaded: the model is built from a config on the meta device and written one decoder layer at a time
as a safetensors shard (so building it never holds more than one layer), with a byte-level BPE tokenizer trained
on the calibration text (its ids all lie below the model's 32000). The prune runs in its own process (the CLI), so
its peak memory is its own; the per-stage seconds and peaks come from its report.json.

    nice -n 10 python benchmarks/llama7b_shape.py --folder /work/tmp/llama7b --out /work/tmp/llama7b-pruned \
        --calib-samples 2 --seq-len 64 --ppl-text none --criterion hywia:steps=2:batch_size=1 --compensate bias \
        --offload disk [--keep]

The folders are removed afterwards unless `--keep` (about 13.5 GB dense, 11 GB pruned).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
             tie_word_embeddings=False)
LLM_PRUNER_NOTE = ("LLM-Pruner's users report about 80 GB of memory to score a 7B model (as issue 18 cites "
                   "them)")


def build(folder: Path, seed: int = 0) -> None:
    """Write config, tokenizer and one safetensors shard per decoder layer (plus one for the rest)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPE, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        shard = f"layer-{int(parts[2]):02d}" if parts[:2] == ["model", "layers"] else "rest"
        groups.setdefault(shard, []).append(name)
    weight_map = {}
    for shard, names in groups.items():
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16)
        filename = f"model-{shard}.safetensors"
        save_file(tensors, str(folder / filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in names})
        del tensors
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)


def _tokenizer():
    """A byte-level BPE tokenizer trained on the calibration passages (vocabulary below the model's 32000)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hywia.data.text import calibration_passages

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(calibration_passages()[:2000], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def run_prune(folder: Path, out: Path, args: argparse.Namespace) -> tuple[dict, float, float]:
    """The default prune as a user runs it (its own process); returns its report, wall seconds and the child's
    peak RSS in MB after its last stage started (the report, then saving, which no stage covers): each stage resets
    the kernel's peak mark, so the child's ru_maxrss is that last stretch's peak, not the whole command's."""
    command = [sys.executable, "-m", "hywia.cli", "prune", "--model", str(folder), "--out", str(out), "--force",
               "--ratio", str(args.ratio), "--dtype", "bfloat16", "--device", "cpu",
               "--calib", "mix", "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len),
               "--ppl-text", args.ppl_text, "--ppl-tokens", str(args.ppl_tokens)]
    # The shipped text, not the default `self`: the weights are random, so their samples would be noise, and writing
    # them streams every offloaded layer from disk once per generated token.
    if args.criterion:
        command += ["--criterion", args.criterion]
    if args.offload:
        command += ["--offload", args.offload]
    if args.compensate:
        command += ["--compensate", args.compensate]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the only child that loads a model
    return json.loads((out / "report.json").read_text()), time.perf_counter() - started, peak_mb


def table(record: dict) -> str:
    report = record["report"]
    lines = [
        f"LLaMA-7B shape ({record['params_before'] / 1e9:.2f}B parameters, random bf16 weights, "
        f"{record['weights_gb']:.1f} GB), default `hywia prune --ratio {record['ratio']}` on {record['machine']}; "
        f"`{record['command_settings']}`. Whole command: {record['wall_seconds'] / 60:.1f} min, "
        f"peak RSS {record['command_peak_rss_mb'] / 1024:.1f} GB (load to save; report and saving "
        f"{record['saving_peak_rss_mb'] / 1024:.1f} GB); parameters {report['params_before'] / 1e9:.2f}B -> "
        f"{report['params_after'] / 1e9:.2f}B.",
        "",
        "| stage | seconds | peak RSS (GB) |",
        "|---|---:|---:|",
    ]
    for name, entry in report["stages"].items():
        lines.append(f"| {name} | {entry['seconds']:.0f} | {entry['peak_rss_mb'] / 1024:.2f} |")
    lines += ["", f"For comparison: {LLM_PRUNER_NOTE}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True, help="where the dense model is built (not the repo)")
    parser.add_argument("--out", type=Path, required=True, help="where the pruned model goes (not the repo)")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--ppl-text", default="lambada", help="'none' skips the before/after perplexity")
    parser.add_argument("--ppl-tokens", type=int, default=512)
    parser.add_argument("--criterion", default=None, help="e.g. hywia:steps=8:batch_size=2 (default: hywia's)")
    parser.add_argument("--offload", choices=("cpu", "disk"), default=None)
    parser.add_argument("--compensate", default=None, help="e.g. bias (default: hywia's, lstsq)")
    parser.add_argument("--keep", action="store_true", help="keep both folders")
    args = parser.parse_args()
    for path in (args.folder, args.out):
        if ROOT in path.resolve().parents:
            parser.error(f"{path} lies inside the repository; use /tmp or /work")
    try:
        if not (args.folder / "model.safetensors.index.json").is_file():
            started = time.perf_counter()
            build(args.folder)
            print(f"built {args.folder} in {time.perf_counter() - started:.0f} s", flush=True)
        report, wall, saving_peak = run_prune(args.folder, args.out, args)
    finally:
        if not args.keep:
            shutil.rmtree(args.out, ignore_errors=True)
            shutil.rmtree(args.folder, ignore_errors=True)
    settings = (f"--dtype bfloat16 --calib mix --calib-samples {args.calib_samples} --seq-len {args.seq_len} "
                f"--ppl-text {args.ppl_text} --ppl-tokens {args.ppl_tokens}" + (f" --criterion {args.criterion}" if args.criterion else "")
                + (f" --offload {args.offload}" if args.offload else "")
                + (f" --compensate {args.compensate}" if args.compensate else ""))
    record = {"ratio": args.ratio, "command_settings": settings, "wall_seconds": round(wall, 1),
              "saving_peak_rss_mb": round(saving_peak, 1),
              "command_peak_rss_mb": round(max(saving_peak, report["peak_rss_mb"]), 1),
              "params_before": report["params_before"], "weights_gb": report["params_before"] * 2 / 1e9,
              "machine": f"{os.cpu_count()} CPU cores, "
                         f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
              "llm_pruner": LLM_PRUNER_NOTE, "report": report}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "llama7b_shape.json").write_text(json.dumps(record, indent=2) + "\n")
    text = table(record)
    (RESULTS / "llama7b_shape.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
