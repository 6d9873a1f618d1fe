"""Settings as small typed objects, and the recipe that holds them all.

A prune is fully described by a `Recipe`: the model, what to remove (`PruneConfig`), the calibration data
(`CalibrationConfig`), where and how it runs (`RuntimeConfig`) and what it measures (`EvalConfig`). Where the output
goes (`out`, `force`) is not part of it, so a saved recipe re-runs anywhere. The CLI's flags are built from these
fields (their `help` metadata) and `hywia.prune` takes the same names as keywords, so every setting is reachable
from both.

A method that has settings of its own (a criterion, an allocation, a compensation) is written as a spec:
`name[:value][:key=value]...`, e.g. `hywia:steps=48:lr=0.05`, `global:floor=0.1`, `lstsq:ridge=0.001`, `fixed:0.5`
(a bare value sets the method's one main setting, where it has one). `:` keeps a spec intact inside the comma lists
and `@` options of `hywia bench --criteria`. The recipe stores each spec with every setting written out, so it
reproduces the run even after a default changes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .data.text import DEFAULT_CALIBRATION
from .errors import InvalidRequestError


@dataclass(frozen=True)
class NoSettings:
    """The settings of a method that has none."""

    positional: ClassVar[str | None] = None


def _convert(text: Any, kind: str, what: str) -> Any:
    """A spec or flag value as the field's type (`int`, `float`, `bool`, `str`, optionally `| None`)."""
    optional = kind.endswith(" | None")
    base, *others = kind.removesuffix(" | None").split(" | ")
    if "dict" in others and isinstance(text, dict):
        return text
    if optional and (text is None or (isinstance(text, str) and text.lower() == "none")):
        return None
    if base == "str" and isinstance(text, os.PathLike):
        return os.fspath(text)
    if not isinstance(text, str):
        if base == "float" and isinstance(text, int) and not isinstance(text, bool):
            return float(text)
        expected = {"int": int, "float": float, "bool": bool, "str": str}.get(base, object)
        if isinstance(text, expected) and not (expected is int and isinstance(text, bool)):
            return text
        raise InvalidRequestError(f"{what} must be {' or '.join([base, *others])}, got {text!r}")
    try:
        if base == "bool":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        return {"int": int, "float": float}.get(base, str)(text)
    except ValueError:
        raise InvalidRequestError(f"{what} must be {base}, got {text!r}") from None


def build_settings(settings_class: type, values: dict[str, Any], what: str) -> Any:
    """`settings_class` from raw values (strings from a spec or numbers from JSON), converted and validated."""
    known = {f.name: f for f in dataclasses.fields(settings_class)}
    unknown = sorted(set(values) - set(known))
    if unknown and not known:
        raise InvalidRequestError(f"{what} takes no settings, got {unknown[0]!r}")
    if unknown:
        raise InvalidRequestError(f"{what} has no setting {unknown[0]!r}; its settings: {', '.join(known)}")
    converted = {key: _convert(value, known[key].type, f"{what} setting {key}") for key, value in values.items()}
    try:
        return settings_class(**converted)
    except ValueError as exc:
        raise InvalidRequestError(f"{what}: {exc}") from None


def parse_spec(spec: str, registry: dict[str, type], what: str) -> tuple[str, Any]:
    """(name, settings) from `name[:value][:key=value]...`, checked against `registry` (name -> settings class)."""
    name, *parts = spec.strip().split(":")
    if name not in registry:
        raise InvalidRequestError(f"unknown {what} {spec!r}; available: {', '.join(sorted(registry))}")
    settings_class = registry[name]
    keys = [f.name for f in dataclasses.fields(settings_class)]
    example = f"{name}:{keys[0]}=VALUE" if keys else name
    values: dict[str, str] = {}
    for index, part in enumerate(parts):
        key, sep, value = part.partition("=")
        if not sep:
            if index == 0 and getattr(settings_class, "positional", None):
                key, value = getattr(settings_class, "positional"), part
            elif keys:
                raise InvalidRequestError(f"{what} {spec!r}: give settings as key=value ({', '.join(keys)}), "
                                          f"e.g. {example}")
            else:
                raise InvalidRequestError(f"{what} {spec!r}: {name} takes no settings")
        if key.strip() in values:
            raise InvalidRequestError(f"{what} {spec!r} sets {key.strip()!r} twice")
        values[key.strip()] = value.strip()
    return name, build_settings(settings_class, values, f"{what} {name!r}")


def describe_specs(registry: dict[str, type]) -> str:
    """Every method of a registry with its settings and their defaults, as the CLI's help lists them."""
    return " | ".join(format_spec(name, settings_class()) for name, settings_class in sorted(registry.items()))


def format_spec(name: str, settings: Any) -> str:
    """The spec with every setting written out (`parse_spec` reads it back to equal settings)."""
    parts = [name] + [f"{f.name}={getattr(settings, f.name)!r}".replace("'", "")
                      for f in dataclasses.fields(settings)]
    return ":".join(parts)


def _setting(default: Any, help: str, **cli: Any) -> Any:
    """A config field with its CLI help (and argparse extras such as `choices`)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class PruneConfig:
    """What to remove and how: the method."""

    ratio: float | None = _setting(None, "share of all decoder-layer parameters to remove, in (0, 1)")
    criterion: str = _setting("hywia", "importance criterion, with its own settings as NAME[:KEY=VALUE]...")
    allocation: str = _setting("global", "uniform: the same share from every pruned layer; log: a share growing "
                                         "with the log of the layer's depth (SlimGPT); global: the groups of all "
                                         "pruned layers ranked together, each layer keeping at least FLOOR; search: "
                                         "the global profile improved by an evolutionary search on the dense "
                                         "model's KL (EvoPress)")
    compensate: str = _setting("lstsq", "bias: fold the removed groups' mean output into a bias (FLAP); lstsq: "
                                        "refit the kept columns by least squares, the ridge (RIDGE x 10^-DECADES.."
                                        "10^DECADES of the mean diagonal) or the bias alone chosen on a share "
                                        "HOLDOUT of the windows held out (0: RIDGE, fitted on all)")
    attention: str = _setting("heads", "remove query heads evenly per KV group, whole KV groups, or no attention "
                                       "(MLP channels only)", choices=("heads", "kv", "none"))
    layers: str | None = _setting(None, "layers to prune as A:B (default: all but the first ~10%% and the last 2)")
    round_to: int | None = _setting(None, "round each pruned layer's kept MLP and attention widths to a multiple "
                                          "of N for GEMM-friendly shapes (heads only where head_dim is not already "
                                          "one); default: 8 where every pruned MLP is wider than 8, else 1")


@dataclass(frozen=True)
class CalibrationConfig:
    """The calibration windows every stage reads (statistics, the fusion, compensation)."""

    calib: str | None = _setting(DEFAULT_CALIBRATION, "built-in source (mix, lambada, wiki; self: the model's own "
                                                      "samples) or a UTF-8 .txt, .jsonl (field 'text') or .json file")
    calib_samples: int = _setting(64, "calibration windows")
    seq_len: int = _setting(128, "tokens per window (calibration and perplexity)")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the run computes; none of it changes which groups go (the seed aside)."""

    device: str | None = _setting(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    dtype: str = _setting("float32", "float32 | bfloat16 | float16")
    importance_path: str = _setting(
        "layerwise", "gradient statistics one layer at a time (little memory) or by full backward (same scores)",
        choices=("layerwise", "plain"))
    activation_store: str = _setting(
        "auto", "where the layerwise path keeps per-sample layer inputs (auto: disk on CPU, else host memory)",
        choices=("auto", "memory", "disk"))
    offload: str | None = _setting(None, "keep the decoder layers there and stream them through --device one at "
                                         "a time", choices=("cpu", "disk"))
    device_map: str | dict | None = _setting(
        None, "let accelerate place the model: auto | balanced | sequential | a JSON file of a device_map")
    offload_folder: str | None = _setting(None, "folder for disk-offloaded weights (default: temporary)")
    seed: int = _setting(0, "seed of the calibration windows and of every random choice")


@dataclass(frozen=True)
class EvalConfig:
    """The before/after perplexity in the report."""

    ppl_text: str | None = _setting("lambada", "held-out text for before/after perplexity, or 'none'")
    ppl_tokens: int = _setting(16384, "tokens of that text")


SECTIONS: dict[str, type] = {"prune": PruneConfig, "calibration": CalibrationConfig, "runtime": RuntimeConfig,
                             "eval": EvalConfig}


def flat_fields() -> dict[str, str]:
    """Every recipe setting's name -> the section holding it (names are unique across sections)."""
    return {f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a prune's result; saved as recipe.json beside the model, read back by `--recipe`."""

    model: str | None = None
    prune: PruneConfig = field(default_factory=PruneConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def replace(self, **settings: Any) -> "Recipe":
        """This recipe with the named settings (flat names: ratio, criterion, seed, ...) replaced."""
        owners = flat_fields()
        unknown = sorted(set(settings) - set(owners) - {"model"})
        if unknown:
            raise InvalidRequestError(f"unknown setting {unknown[0]!r}; settings: model, {', '.join(owners)}")
        changes: dict[str, dict] = {}
        for name, value in settings.items():
            if name != "model":
                changes.setdefault(owners[name], {})[name] = value
        sections = {section: _converted(getattr(self, section), values) for section, values in changes.items()}
        return dataclasses.replace(self, **sections, **({"model": settings["model"]} if "model" in settings else {}))

    def to_dict(self) -> dict:
        return {"model": self.model, **{section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS}}

    @classmethod
    def from_dict(cls, data: dict, source: str = "recipe") -> "Recipe":
        """A recipe from `to_dict`'s layout; a report.json that embeds one (key "recipe") is read the same way."""
        data = data.get("recipe", data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or not set(data) <= {"model", *SECTIONS}:
            extra = sorted(set(data) - {"model", *SECTIONS}) if isinstance(data, dict) else []
            raise InvalidRequestError(f"{source} is not a recipe" + (f" (unknown key {extra[0]!r})" if extra else ""))
        flat = {name: value for section in SECTIONS for name, value in (data.get(section) or {}).items()}
        if any(not isinstance(data.get(section) or {}, dict) for section in SECTIONS):
            raise InvalidRequestError(f"{source}: every section must be a JSON object")
        try:
            return cls(model=data.get("model")).replace(**flat)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"{source}: {exc}") from None

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidRequestError(f"cannot read recipe {path}: {exc}") from None
        return cls.from_dict(data, source=f"recipe {path}")


def _converted(config: Any, values: dict[str, Any]) -> Any:
    """`config` with `values` replaced, each converted to its field's type (a JSON or flag value)."""
    kinds = {f.name: f.type for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{
        name: value if name == "device_map" and isinstance(value, dict) else _convert(value, kinds[name], name)
        for name, value in values.items()
    })
