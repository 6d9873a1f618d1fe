"""benchmarks/speed.py: how much faster pruned models run, measured against the ceiling their MACs set.

Structured pruning is worth its accuracy loss only if the smaller model runs faster. The ceiling is what the removed
arithmetic could buy at most: dense MACs per token / pruned MACs per token, counting every Linear weight once
(lm_head included; the embedding is a lookup). Measured speed-up / ceiling says how much of it turns into time.

Measurements run on one thread (the machines this runs on are shared) and interleave the models: within every
repetition each measurement runs the dense model and all its pruned copies back to back, in an order rotated from
one repetition to the next, so machine noise hits all alike. Speed-ups are taken within a repetition (dense and
pruned measured moments apart) and their median over repetitions is reported.

- prefill: one forward over the prompt, logits of every position (so the ceiling's lm_head term holds exactly);
- decode: greedy `model.generate` from a one-token prompt (as llama-bench's tg), exactly `new_tokens` tokens, plain
  loop with its dynamic KV cache; the models take turns every `decode_chunk` tokens, each resuming from its own
  cache, and the rate counts the steps between tokens: the decode steps alone, each with generate's own
  per-token work;
- decode static+compile (chosen shapes and batch sizes): the same with a static KV cache and the forward under
  torch.compile, which takes the loop's fixed per-token cost off a small model.

Besides uniform widths, `plans` times the per-layer widths of real prunes (a hywia report.json or plan.json): the
widths a default `hywia prune` gives are what its users run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import (
    Cache,
    DynamicCache,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    StaticCache,
)

from hywia.errors import InvalidRequestError
from hywia.models import LayerKind, adapter_for
from hywia.pruning import allocate_uniform, apply_plan, select
from hywia.pruning.plan import group_cost

SHAPES = ("smollm2-135m", "llama-7b-shaped")
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000)


_WIDTH_KEYS = {"head": "num_attention_heads", "kv": "num_key_value_heads", "mlp": "intermediate_size"}


@dataclass(frozen=True)
class Variant:
    """One pruned copy: share of decoder parameters removed, and every round-to that gives its widths; or, for a
    real plan (`source` names it), the kept count of every (layer, kind) it prunes."""

    ratio: float
    round_to: tuple[int, ...] = (1,)
    source: str | None = None
    keep: tuple[tuple[LayerKind, int], ...] = ()

    @property
    def label(self) -> str:
        if self.source is not None:
            path = Path(self.source)
            name = path.resolve().parent.name if path.stem in ("report", "plan") else path.stem
            return f"{name} ({self.ratio:.1%})"
        return "dense" if self.ratio == 0 else f"{self.ratio:.0%} round-to {'/'.join(map(str, self.round_to))}"


def plan_variant(model: nn.Module, path: str | Path) -> Variant:
    """The widths of a real prune of this model's shape, from its report.json (per-layer widths under "layers")
    or plan.json (kept indices, or a copy of either under another name); labelled with the file's name, or the
    folder holding it for report.json and plan.json. Which groups it kept does not matter."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"cannot read plan widths from {path}: {exc}") from exc
    attention = data.get("attention", "heads")
    adapter = adapter_for(model, attention)
    layers = adapter.layers()
    if "layers" not in data:
        raise InvalidRequestError(f"{path} is neither a hywia report.json nor a plan.json (no 'layers')")
    if isinstance(data["layers"], list):  # report.json: every layer's widths
        if len(data["layers"]) != len(layers):
            raise InvalidRequestError(f"{path} has {len(data['layers'])} layers, the model {len(layers)}")
        counts = {(i, spec.kind): widths[_WIDTH_KEYS[spec.kind]]
                  for i, widths in enumerate(data["layers"]) for spec in adapter.group_specs(layers[i])}
    else:  # plan.json: the kept indices of the pruned layers
        counts = {(int(i), kind): len(kept) for i, kinds in data["layers"].items() for kind, kept in kinds.items()}
    keep, removed = [], 0
    for (i, kind), count in sorted(counts.items()):
        spec = next((s for s in adapter.group_specs(layers[i]) if s.kind == kind), None) if i < len(layers) else None
        if spec is None or not 0 < count <= spec.count:
            raise InvalidRequestError(f"{path}: layer {i} {kind} keeps {count}, which this model's shape cannot hold")
        if count < spec.count:
            keep.append(((i, kind), count))
            removed += (spec.count - count) * group_cost(layers[i], spec)
    return Variant(removed / adapter.num_decoder_params(), source=str(path), keep=tuple(keep))


def plan_origin(path: str) -> dict:
    """How a plan's file came about, as its report.json says (the prune's recipe settings); {} for a plan.json."""
    data = json.loads(Path(path).read_text())
    prune = data.get("recipe", {}).get("prune", {})
    return {key: prune[key] for key in ("ratio", "criterion", "allocation", "compensate", "round_to", "layers")
            if key in prune}


@dataclass
class SpeedSettings:
    """Everything that decides the numbers; stored in the JSON next to them."""

    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    ratios: list[float] = field(default_factory=lambda: [0.2, 0.5])
    round_to: list[int] = field(default_factory=lambda: [1, 8, 64])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    prompt_len: int = 128
    new_tokens: int = 128
    decode_chunk: int = 32
    compile_shapes: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    compile_batch_sizes: list[int] = field(default_factory=lambda: [8])
    repetitions: list[int] = field(default_factory=lambda: [3])
    llama_layers: int = 2
    plans: list[str] = field(default_factory=list)  # report.json / plan.json files of prunes of the shapes timed
    seed: int = 0

    def repetitions_of(self, shape: str) -> int:
        """Repetitions for one shape: one value for all, or one per shape in the order of `shapes`."""
        if len(self.repetitions) == 1:
            return self.repetitions[0]
        if len(self.repetitions) != len(self.shapes):
            raise InvalidRequestError(f"give one repetition count, or one per shape ({len(self.shapes)})")
        return self.repetitions[self.shapes.index(shape)]


def build_shape(name: str, llama_layers: int = 2, seed: int = 0) -> tuple[nn.Module, str]:
    """(model in eval mode, description for the table) for one of `SHAPES`."""
    if name == "smollm2-135m":
        from hywia.io import describe, load_model

        model, _ = load_model(None, device="cpu", dtype="float32")
        return model, f"{describe(None)}, real weights"
    if name == "llama-7b-shaped":
        config = LlamaConfig(**LLAMA_7B, num_hidden_layers=llama_layers, tie_word_embeddings=False)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
        return model, (f"LLaMA-7B-shaped stack (hidden 4096, MLP 11008, 32 heads, vocab 32000), {llama_layers} "
                       "layers, random weights: speed does not depend on their values")
    raise InvalidRequestError(f"unknown shape {name!r}; choose from {', '.join(SHAPES)}")


def plan_variants(model: nn.Module, ratios: Sequence[float], round_to: Sequence[int],
                  plans: Sequence[str] = ()) -> list[Variant]:
    """Dense, then every ratio at every round-to (roundings that give the same widths share one entry), then the
    widths of every real plan.

    Halving every layer of a LLaMA lands on multiples of 64 already (1536 -> 768, 11008 -> 5504), so at 50% the
    roundings coincide and timing them apart would only measure noise.
    """
    adapter = adapter_for(model)
    layers = list(range(len(adapter.layers())))
    variants = [Variant(0.0)]
    for ratio in ratios:
        by_widths: dict[tuple, list[int]] = {}
        for n in round_to:
            keep = allocate_uniform(adapter, layers, ratio, round_to=n)
            by_widths.setdefault(tuple(sorted(keep.items())), []).append(n)
        variants += [Variant(ratio, tuple(ns)) for ns in by_widths.values()]
    variants += [plan_variant(model, path) for path in plans]
    labels = [v.label for v in variants]
    if len(set(labels)) < len(labels):
        raise InvalidRequestError(f"two variants share the label {max(labels, key=labels.count)!r}: give plans "
                                  "from differently named folders")
    return variants


def pruned_copy(model: nn.Module, variant: Variant, seed: int = 0) -> nn.Module:
    """The model with `variant.ratio` of its decoder parameters removed uniformly from every layer, or with a real
    plan's kept counts.

    Scores are random: speed depends on the widths only. Uniform variants prune every layer (the same widths in all
    of them, so shapes of different depth get comparable widths). The copy starts from the dense model's tensors: surgery puts
    a new tensor in place of every one it prunes and never writes into the old, so memory holds the embedding,
    lm_head and whatever else is not pruned once, and no transient full-size copy of the decoder.
    """
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    pruned = copy.deepcopy(model, memo=shared)
    kinds = {kind for (_, kind), _ in variant.keep}
    adapter = adapter_for(pruned, "kv" if "kv" in kinds else "heads")
    if variant.source is not None:
        keep = dict(variant.keep)
        layers = sorted({i for i, _ in keep})
    else:
        layers = list(range(len(adapter.layers())))
        keep = allocate_uniform(adapter, layers, variant.ratio, round_to=variant.round_to[0])
    generator = torch.Generator().manual_seed(seed)
    scores = {(i, spec.kind): torch.rand(spec.count, generator=generator)
              for i in layers for spec in adapter.group_specs(adapter.layers()[i]) if (i, spec.kind) in keep}
    return apply_plan(pruned, select(adapter, scores, keep)).eval()


def macs_per_token(model: nn.Module) -> int:
    """Multiply-accumulates per token: one per weight of every Linear (a tied lm_head counts once, as a Linear).

    Attention scores (query x key products) are left out: they grow with the context, not the widths alone.
    """
    weights = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)}
    return sum(weights.values())


def ceiling(dense: nn.Module, pruned: nn.Module) -> float:
    """The speed-up the pruned model could reach if time followed MACs exactly."""
    return macs_per_token(dense) / macs_per_token(pruned)


def layer_widths(model: nn.Module) -> list[str]:
    """Distinct per-layer widths as 'heads/kv heads/MLP' (one entry when every layer has the same)."""
    adapter = adapter_for(model)
    widths = [adapter.widths(layer) for layer in adapter.layers()]
    text = [f"{w['num_attention_heads']}/{w['num_key_value_heads']}/{w['intermediate_size']}" for w in widths]
    return list(dict.fromkeys(text))


@torch.inference_mode()
def prefill_seconds(model: nn.Module, ids: torch.Tensor) -> float:
    """Wall time of one forward over `ids` (batch x tokens), logits of every position included."""
    start = time.perf_counter()
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return time.perf_counter() - start


class _TokenClock(LogitsProcessor):
    """Stamps the moment each new token's logits are ready; the span from first to last covers decode steps only."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores


def greedy_config(model: nn.Module, tokens: int) -> GenerationConfig:
    """Greedy decoding of exactly `tokens` tokens: the end-of-text id is one outside the vocabulary, so nothing
    stops early and the loop keeps generate's own end-of-text check. `min_new_tokens` would instead add a
    vocabulary-wide `where` to every step (about 13 ms a step, 7% of a dense step, at batch 8 on SmolLM2 here,
    under the profiler), the same for every model: not the model's work, and it diluted every speed-up."""
    return GenerationConfig(max_new_tokens=tokens, do_sample=False, pad_token_id=0,
                            eos_token_id=model.config.vocab_size)


class Decoder:
    """One model's greedy `generate`, resumable chunk after chunk from its own tokens and KV cache.

    Chunks let several models take turns within one measurement, so a busy spell of the machine slows them all
    rather than whichever happened to run then. Only steps between two tokens of a chunk are timed: each chunk's
    first step runs inside generate's set-up.
    """

    def __init__(self, model: nn.Module, prompt: torch.Tensor, cache: Cache | None = None) -> None:
        self.model, self.ids = model, prompt
        self.cache = cache if cache is not None else DynamicCache(config=model.config)
        self.steps, self.seconds = 0, 0.0

    @torch.inference_mode()
    def advance(self, tokens: int) -> None:
        """Generate `tokens` more tokens (greedy, no early stop)."""
        clock = _TokenClock()
        self.ids = self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), past_key_values=self.cache,
                                       generation_config=greedy_config(self.model, tokens),
                                       logits_processor=LogitsProcessorList([clock]))
        self.steps += len(clock.stamps) - 1
        self.seconds += clock.stamps[-1] - clock.stamps[0]

    def tokens_per_second(self) -> float:
        """Over all rows of the batch."""
        return self.ids.shape[0] * self.steps / self.seconds


def compiled_twin(model: nn.Module) -> nn.Module:
    """A second module over the same tensors whose forward runs under torch.compile (shapes specialised).

    With a static KV cache every decode step has the same shapes, so one graph serves them all and the generate
    loop's per-token Python work shrinks to a graph call. The original keeps its eager forward for the plain runs.
    """
    twin = copy.deepcopy(model, memo={id(t): t for t in (*model.parameters(), *model.buffers())})
    twin.forward = torch.compile(twin.forward, dynamic=False)
    return twin


def static_cache(model: nn.Module, length: int) -> StaticCache:
    return StaticCache(config=model.config, max_cache_len=length)


def chunk_sizes(new_tokens: int, chunk: int) -> list[int]:
    """`new_tokens` split into near-equal chunks of about `chunk` tokens, each at least 2 (one timed step)."""
    if new_tokens < 2 or chunk < 2:
        raise InvalidRequestError("decode needs at least 2 new tokens per chunk: its rate is timed between tokens")
    count = max(1, new_tokens // chunk)
    return [new_tokens // count + (i < new_tokens % count) for i in range(count)]


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread while measuring, restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure(
    models: dict[str, nn.Module],
    *,
    vocab_size: int,
    batch_sizes: Sequence[int] = (1, 8),
    prompt_len: int = 128,
    new_tokens: int = 128,
    decode_chunk: int = 32,
    compiled_batch_sizes: Sequence[int] = (),
    repetitions: int = 3,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict]:
    """Per measurement ('prefill b8', 'decode b1', ...), the samples of every model and their median.

    Within a repetition the models run back to back in a rotated order (decode: taking turns every `decode_chunk`
    tokens). The first model is the reference: speed-ups are taken against it within each repetition, and their
    median is the speed-up. A warm-up at small sizes runs every code path of every model once before timing.
    At `compiled_batch_sizes` decode is measured a second time with a static KV cache and a torch.compile'd
    forward ('decode b8 static+compile'); its warm-up compiles, and how long that took is kept.
    """
    if repetitions < 1:
        raise InvalidRequestError("repetitions must be at least 1")
    chunks = chunk_sizes(new_tokens, decode_chunk)
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab_size, (max(batch_sizes), prompt_len), generator=generator)
    labels = list(models)
    twins = {label: compiled_twin(model) for label, model in models.items()} if compiled_batch_sizes else {}

    def prefill(batch: int, order: list[str]) -> dict[str, float]:
        return {label: prefill_seconds(models[label], prompts[:batch]) for label in order}

    def decode(batch: int, order: list[str]) -> dict[str, float]:
        decoders = {label: Decoder(models[label], prompts[:batch, :1]) for label in order}
        return take_turns(decoders, order)

    def decode_compiled(batch: int, order: list[str]) -> dict[str, float]:
        decoders = {label: Decoder(twins[label], prompts[:batch, :1], static_cache(twins[label], 1 + new_tokens))
                    for label in order}
        return take_turns(decoders, order)

    def take_turns(decoders: dict[str, Decoder], order: list[str]) -> dict[str, float]:
        for tokens in chunks:
            for label in order:
                decoders[label].advance(tokens)
        return {label: decoder.tokens_per_second() for label, decoder in decoders.items()}

    runs = [(f"prefill b{b}", "s", prefill, b) for b in batch_sizes]
    runs += [(f"decode b{b}", "tokens/s", decode, b) for b in batch_sizes]
    runs += [(f"decode b{b} static+compile", "tokens/s", decode_compiled, b) for b in compiled_batch_sizes]
    compile_seconds: dict[str, dict[str, float]] = {f"decode b{b} static+compile": {} for b in compiled_batch_sizes}
    # every model and batch size adds two graphs (empty cache, filled cache) to the same forward code: allow them
    graphs = 2 * len(models) * len(compiled_batch_sizes)
    with single_thread(), torch._dynamo.config.patch(recompile_limit=8 + graphs):
        for label, model in models.items():
            for b in batch_sizes:
                prefill_seconds(model, prompts[:b, : min(prompt_len, 8)])
                Decoder(model, prompts[:b, :1]).advance(4)
            for b in compiled_batch_sizes:
                start = time.perf_counter()
                Decoder(twins[label], prompts[:b, :1], static_cache(twins[label], 1 + new_tokens)).advance(4)
                compile_seconds[f"decode b{b} static+compile"][label] = time.perf_counter() - start
        samples = {name: {label: [] for label in labels} for name, *_ in runs}
        for rep in range(repetitions):
            shift = rep % len(labels)
            for name, _, run, batch in runs:
                values = run(batch, labels[shift:] + labels[:shift])
                for label in labels:
                    samples[name][label].append(values[label])
                if progress:
                    shown = ", ".join(f"{label} {values[label]:.3g}" for label in labels)
                    print(f"[speed] repetition {rep + 1}/{repetitions} {name}: {shown}", file=sys.stderr, flush=True)
    results = {}
    for name, unit, *_ in runs:
        per_model = samples[name]
        reference = per_model[labels[0]]
        paired = {label: [(r / v if unit == "s" else v / r) for r, v in zip(reference, per_model[label])]
                  for label in labels[1:]}
        results[name] = {"unit": unit, "samples": per_model,
                         "median": {label: statistics.median(v) for label, v in per_model.items()},
                         "speedup_samples": paired,
                         "speedup": {label: statistics.median(v) for label, v in paired.items()}}
        if name in compile_seconds:
            results[name]["compile_seconds"] = compile_seconds[name]
    return results


def benchmark_shape(name: str, model: nn.Module, description: str, settings: SpeedSettings) -> dict:
    """Prune the variants of one shape, measure them all interleaved, and relate each speed-up to its ceiling."""
    start = time.perf_counter()
    variants = plan_variants(model, settings.ratios, settings.round_to, settings.plans)
    models = {v.label: model if v.ratio == 0 else pruned_copy(model, v, settings.seed) for v in variants}
    dense_params = sum(p.numel() for p in model.parameters())
    rows = []
    for v in variants:
        m = models[v.label]
        decoder = adapter_for(m).num_decoder_params()
        rows.append({"label": v.label, "ratio": v.ratio, "round_to": list(v.round_to),
                     "params": sum(p.numel() for p in m.parameters()), "decoder_params": decoder,
                     "macs_per_token": macs_per_token(m), "ceiling": ceiling(model, m), "widths": layer_widths(m)})
        if v.source is not None:
            rows[-1].update(round_to=[], plan={"file": v.source, **plan_origin(v.source)})
    measurements = measure(models, vocab_size=model.config.vocab_size, batch_sizes=settings.batch_sizes,
                           prompt_len=settings.prompt_len, new_tokens=settings.new_tokens,
                           decode_chunk=settings.decode_chunk,
                           compiled_batch_sizes=settings.compile_batch_sizes if name in settings.compile_shapes else (),
                           repetitions=settings.repetitions_of(name),
                           seed=settings.seed, progress=True)
    for result in measurements.values():
        result["of_ceiling"] = {row["label"]: result["speedup"][row["label"]] / row["ceiling"]
                                for row in rows[1:]}
    return {"shape": name, "description": description, "repetitions": settings.repetitions_of(name),
            "dense_params": dense_params, "variants": rows, "measurements": measurements,
            "seconds": time.perf_counter() - start}


def run_speed(settings: SpeedSettings, out_dir: str | Path, command: str, file_stem: str = "speed") -> dict:
    """Benchmark every shape and write FILE_STEM.json and FILE_STEM.md into `out_dir`; returns the record."""
    from hywia.eval.api import machine
    from hywia.io.checks import strict_json

    unknown = [s for s in settings.shapes if s not in SHAPES]
    if unknown:
        raise InvalidRequestError(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    for name in settings.shapes:  # a bad count fails now, not after the first shape's half hour
        settings.repetitions_of(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    record = {"command": command, "settings": asdict(settings), "load_average_before": os.getloadavg(),
              "shapes": []}
    for name in settings.shapes:
        model, description = build_shape(name, settings.llama_layers, settings.seed)
        record["shapes"].append(benchmark_shape(name, model, description, settings))
        del model
    with single_thread():
        record["machine"] = machine()
    record["load_average_after"] = os.getloadavg()
    record["seconds"] = time.perf_counter() - start
    (out / f"{file_stem}.json").write_text(strict_json(record, indent=1))
    (out / f"{file_stem}.md").write_text(render_markdown(record))
    return record


def _cell(result: dict, label: str) -> str:
    if label == "dense":
        value = result["median"][label]
        return f"{value * 1000:.0f} ms" if result["unit"] == "s" else f"{value:.1f} tok/s"
    return f"{result['speedup'][label]:.2f}x / **{result['of_ceiling'][label]:.2f}**"


def render_markdown(record: dict, goal: float = 0.9) -> str:
    """One table per shape: per variant its size and ceiling, then per measurement speed-up / share of ceiling."""
    s = record["settings"]
    load = ", ".join(f"{a:.1f}" for a in record["load_average_before"])
    m = record["machine"]
    lines = [
        "# Speed of pruned models against their MAC ceiling",
        "",
        f"Regenerate: `{record['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, shared with other work (load average {load} at the start): "
        f"every measurement on **1 thread**; torch {m['torch']}, transformers {m['transformers']}, float32.",
        f"Prefill: one forward over {s['prompt_len']} random tokens, logits of every position. Decode: greedy "
        f"`generate` of {s['new_tokens']} tokens from a 1-token prompt (no early stop: the end-of-text id lies "
        "outside the vocabulary), plain loop (dynamic KV cache), the models "
        f"taking turns every {s['decode_chunk']} tokens (each resumes from its own cache); tokens/s over all rows, "
        "decode steps only. `static+compile`: the same decode with a static KV cache and the forward under "
        "`torch.compile` (compiled in the warm-up, not timed).",
        "Pruning: uniform allocation over every layer, or a real prune's per-layer widths (its file below); random "
        "choice of the groups kept (speed depends on the widths only). "
        "Repetitions are interleaved, after a warm-up; each cell is the median over repetitions of the speed-up "
        "against the dense model measured in the same repetition (every sample is in speed.json).",
        "Ceiling = dense MACs per token / pruned MACs per token, every Linear weight once (lm_head included, "
        "attention scores left out). Dense cells show the absolute median; pruned cells show "
        f"`speed-up / **speed-up as a share of the ceiling**` (goal: >= {goal}).",
    ]
    for shape in record["shapes"]:
        names = list(shape["measurements"])
        lines += ["", f"## {shape['shape']}", "",
                  f"{shape['description']}. {shape['repetitions']} repetition(s), {shape['seconds'] / 60:.1f} min.",
                  "",
                  "| variant | widths (heads/kv/MLP) | params | MACs/token | ceiling | " + " | ".join(names) + " |",
                  "|" + "---|" * (5 + len(names))]
        for row in shape["variants"]:
            cells = [row["label"], ", ".join(row["widths"]), f"{row['params'] / 1e6:.1f}M",
                     f"{row['macs_per_token'] / 1e6:.1f}M", f"{row['ceiling']:.2f}x"]
            cells += [_cell(shape["measurements"][n], row["label"]) for n in names]
            lines.append("| " + " | ".join(cells) + " |")
        lines += _plan_lines(shape, goal)
        for name in names:
            compile_seconds = shape["measurements"][name].get("compile_seconds")
            if compile_seconds:
                lines += ["", f"{name}: compiling took {min(compile_seconds.values()):.0f}-"
                              f"{max(compile_seconds.values()):.0f} s per model (torch reuses kernels an earlier run "
                              "cached on disk: a first run compiles longer)."]
    after = ", ".join(f"{a:.1f}" for a in record["load_average_after"])
    lines += ["", f"Total wall time {record['seconds'] / 60:.1f} min; load average {after} at the end.", ""]
    return "\n".join(lines)


def _plan_lines(shape: dict, goal: float) -> list[str]:
    """Per real plan: where its widths come from, and for every measurement whether it reaches the goal."""
    lines = []
    for row in shape["variants"]:
        if "plan" not in row:
            continue
        origin = ", ".join(f"{key} {value}" for key, value in row["plan"].items() if key != "file")
        lines += ["", f"`{row['label']}`: widths of `{row['plan']['file']}`" + (f" ({origin})" if origin else "")
                  + f"; {row['ratio']:.1%} of the decoder parameters removed. Goal >= {goal} of the ceiling:"]
        for name, result in shape["measurements"].items():
            share = result["of_ceiling"][row["label"]]
            lines.append(f"- {name}: {'met' if share >= goal else 'not met'}, {share:.2f} "
                         f"({result['speedup'][row['label']]:.2f}x of a {row['ceiling']:.2f}x ceiling)")
    return lines


def add_speed_flags(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The settings as flags of benchmarks/speed.py (as --PREFIXname with a `prefix`).

    Flags default to None (meaning: the SpeedSettings default), so they stay out of commands that do not use them.
    """
    d = SpeedSettings()

    def flag(name: str, help: str) -> None:
        dest = name.replace("-", "_")
        default = getattr(d, dest)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        parser.add_argument(f"--{prefix}{name}", dest=f"speed_{dest}", default=None, metavar=dest.upper(),
                            help=f"{help} [{shown}]")

    flag("shapes", f"comma list of {', '.join(SHAPES)}")
    flag("ratios", "comma list of shares of decoder parameters removed")
    flag("round-to", "comma list of multiples kept widths are rounded to, tried at every ratio")
    flag("batch-sizes", "comma list")
    flag("prompt-len", "prefill tokens")
    flag("new-tokens", "decoded tokens")
    flag("decode-chunk", "decode tokens a model generates before the next model takes its turn")
    flag("compile-shapes", "shapes whose decode is measured again with a static KV cache and torch.compile, or none")
    flag("compile-batch-sizes", "batch sizes of that second decode measurement")
    flag("repetitions", "interleaved timed repetitions: one count, or a comma list with one per shape")
    flag("llama-layers", "decoder layers of the LLaMA-7B-shaped stack")
    flag("plans", "comma list of hywia report.json or plan.json files whose per-layer widths are timed too, or none")


def settings_from_args(args: argparse.Namespace) -> SpeedSettings:
    """SpeedSettings from the parsed flags (and --seed); flags left out keep their defaults."""
    values = {}
    for key, default in asdict(SpeedSettings()).items():
        text = getattr(args, f"speed_{key}", None)
        if text is None:
            continue
        if isinstance(default, list) and str(text).strip().lower() == "none":
            values[key] = []
            continue
        kind = (type(default[0]) if default else str) if isinstance(default, list) else type(default)
        try:
            items = [kind(x.strip()) for x in str(text).split(",") if x.strip()]
        except ValueError as exc:
            raise InvalidRequestError(f"speed setting {key}: cannot read {text!r} as {kind.__name__}") from exc
        if not items:
            raise InvalidRequestError(f"speed setting {key} is empty")
        values[key] = items if isinstance(default, list) else items[0]
    return SpeedSettings(**values, seed=args.seed)


def command_line(program: list[str], settings: SpeedSettings, prefix: str = "", extra: Sequence[str] = ()) -> str:
    """The command with every setting spelled out, so it regenerates the table even after a default changes."""
    words = list(program)
    for key, value in asdict(settings).items():
        flag = "--seed" if key == "seed" else f"--{prefix}{key.replace('_', '-')}"
        words += [flag, (",".join(map(str, value)) or "none") if isinstance(value, list) else str(value)]
    return shlex.join(words + list(extra))
