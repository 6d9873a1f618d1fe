"""llama.cpp speed of a dense model and its pruned versions, each exported with `hywia export`: prompt-processing and
generation tokens/s through llama-cpp-python. Writes benchmarks/results/llamacpp_speed.json and llamacpp_speed.md.

    pip install -r requirements-llamacpp.txt        # builds llama.cpp (~10 minutes on 2 cores)
    hywia prune --ratio 0.2 --criterion taylor-element1 --calib-samples 16 --out /tmp/exp-p20
    hywia prune --ratio 0.5 --criterion taylor-element1 --calib-samples 16 --out /tmp/exp-p50
    python benchmarks/llamacpp_speed.py --pruned /tmp/exp-p20 --pruned /tmp/exp-p50

Generation is greedy, one llama_decode per token with the argmax taken in numpy (well under 1% of a step here).
Each figure is the median of --repeats runs, the models taking turns; the spread (min..max) is in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pool (used by the export)

import numpy as np  # noqa: E402

from hywia.data.text import lambada_passages  # noqa: E402
from hywia.errors import HywiaError  # noqa: E402
from hywia.io import describe  # noqa: E402
from hywia.io.gguf_export import export_gguf  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def next_token(llama_cpp, llm) -> int:
    """Greedy choice from the last position's logits (read in place: llama-cpp-python keeps no copy without
    logits_all)."""
    logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))


def run_once(llama_cpp, llm, prompt: list[int], gen_tokens: int) -> tuple[float, float]:
    """(prompt tokens/s, generation tokens/s) of one prompt evaluation and greedy continuation."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - start
    token = next_token(llama_cpp, llm)
    start = time.perf_counter()
    for _ in range(gen_tokens):
        llm.eval([token])
        token = next_token(llama_cpp, llm)
    return len(prompt) / prompt_s, gen_tokens / (time.perf_counter() - start)


def measure(llama_cpp, paths: list[Path], prompt_tokens: int, gen_tokens: int, threads: int,
            repeats: int) -> list[dict]:
    """Median tokens/s of each GGUF file and the runs' spread. The files take turns run by run, so a change in the
    machine's other load falls on all of them alike rather than on whichever model ran at the time."""
    models = [llama_cpp.Llama(model_path=str(path), n_ctx=prompt_tokens + gen_tokens + 8, n_batch=prompt_tokens,
                              n_threads=threads, n_threads_batch=threads, verbose=False) for path in paths]
    text = " ".join(lambada_passages()[:40])
    prompt = models[0].tokenize(text.encode(), add_bos=False)[:prompt_tokens]
    if len(prompt) < prompt_tokens:
        raise HywiaError(f"only {len(prompt)} prompt tokens available, asked for {prompt_tokens}")
    runs: list[list[tuple[float, float]]] = [[] for _ in models]
    for repeat in range(repeats + 1):  # the first round warms caches and is dropped
        for llm, model_runs in zip(models, runs):
            result = run_once(llama_cpp, llm, prompt, gen_tokens)
            if repeat:
                model_runs.append(result)
    for llm in models:
        llm.close()
    speeds = []
    for model_runs in runs:
        prompt_tps, gen_tps = [r[0] for r in model_runs], [r[1] for r in model_runs]
        speeds.append({"prompt_tps": statistics.median(prompt_tps),
                       "prompt_tps_range": [min(prompt_tps), max(prompt_tps)],
                       "gen_tps": statistics.median(gen_tps), "gen_tps_range": [min(gen_tps), max(gen_tps)]})
    return speeds


def render_markdown(record: dict) -> str:
    s = record["settings"]
    lines = [
        f"llama.cpp (llama-cpp-python {record['llama_cpp_python']}), {s['outtype']} GGUF, {s['threads']} thread(s), "
        f"prompt {s['prompt_tokens']} tokens, {s['gen_tokens']} generated greedily, median of {s['repeats']} runs; "
        f"{record['machine']}. Base model: {record['base_model']}.",
        "",
        "| model | params removed | pruning | MLP widths aligned to 32 | GGUF arch | file MiB | prompt tok/s | "
        "speed-up | generation tok/s | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense = record["rows"][0]
    for row in record["rows"]:
        lines.append(
            f"| {row['label']} | {row['ratio']:.0%} | {row['pruning']} | "
            f"{'no' if row['unaligned_mlp_widths'] else 'yes'} | {row['arch']} | {row['file_mib']:.1f} | "
            f"{row['prompt_tps']:.0f} | {row['prompt_tps'] / dense['prompt_tps']:.2f}x | {row['gen_tps']:.1f} | "
            f"{row['gen_tps'] / dense['gen_tps']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", default="smollm2-135m", help="the unpruned model (folder or embedded name)")
    parser.add_argument("--pruned", action="append", required=True,
                        help="a pruned folder written by `hywia prune` (repeatable); its report.json gives the ratio")
    parser.add_argument("--outtype", default="f16", help="GGUF tensor type: f32 | f16 | bf16 | q8_0")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("llamacpp_speed.py: error: llama-cpp-python is not installed (pip install -r "
              "requirements-llamacpp.txt)", file=sys.stderr)
        return 2
    models = [("dense", args.dense, 0.0, "-")]
    for folder in args.pruned:
        report = json.loads((Path(folder) / "report.json").read_text())
        how = (f"{report['criterion']}, {report.get('allocation', 'uniform')}, compensate "
               f"{report.get('compensate', 'none')}, round-to {report.get('round_to', 1)}")
        models.append((Path(folder).name, folder, report["ratio_achieved"], how))
    load_before = os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory(prefix="hywia-llamacpp-") as work:
            exports = [export_gguf(model, Path(work) / f"{label}.gguf", outtype=args.outtype)
                       for label, model, _, _ in models]
            speeds = measure(llama_cpp, [e.path for e in exports], args.prompt_tokens, args.gen_tokens, args.threads,
                             args.repeats)
    except HywiaError as exc:
        print(f"llamacpp_speed.py: error: {exc}", file=sys.stderr)
        return 2
    record = {
        "settings": vars(args),
        "llama_cpp_python": llama_cpp.__version__,
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, shared: 1-minute load average "
                   f"{load_before:.1f} before and {os.getloadavg()[0]:.1f} after",
        "base_model": describe(args.dense),
        "command": " ".join(["python", "benchmarks/llamacpp_speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "rows": [{"label": label, "model": str(model), "ratio": ratio, "pruning": how, "arch": exported.arch,
                  "unaligned_mlp_widths": exported.unaligned_widths, "file_mib": exported.file_bytes / 2**20, **speed}
                 for (label, model, ratio, how), exported, speed in zip(models, exports, speeds)],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "llamacpp_speed.json").write_text(json.dumps(record, indent=1) + "\n")
    markdown = render_markdown(record)
    (RESULTS / "llamacpp_speed.md").write_text(markdown)
    print(markdown)
    print(f"written: {RESULTS / 'llamacpp_speed.json'}, {RESULTS / 'llamacpp_speed.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
