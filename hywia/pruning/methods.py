"""The allocations and compensations by name, each with its own settings (specs as in hywia.settings)."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import NoSettings, parse_spec
from .plan import ATTENTION_WEIGHT, GLOBAL_FLOOR, check_global_settings
from .search import ProfileSearch


@dataclass(frozen=True)
class GlobalAllocation:
    floor: float = GLOBAL_FLOOR  # share of its groups every pruned (layer, kind) keeps at least
    # attention groups' scores are multiplied by this in the ranking: above 1 heads go later, channels earlier
    # (`allocate_global`). 16 by default: calibration prose undervalues the heads that other genres (dialogue, code)
    # need; over nine cross-domain cells (SmolLM2-135M and Gemma-3-270M) it beat 1 (BENCHMARKS.md, cross-domain)
    attention_weight: float = ATTENTION_WEIGHT

    def __post_init__(self) -> None:
        check_global_settings(self.floor, self.attention_weight)


@dataclass(frozen=True)
class LeastSquares:
    ridge: float = 1e-2  # added to the Gram matrix's diagonal, in units of its mean diagonal
    # share of the calibration windows held out to choose each projection's fit among ridge x 10^-D..10^D and the
    # bias alone (0: the fixed ridge, fitted on every window). 0.25 by default: the fixed ridge overfits the
    # calibration text, the held-out choice was better on every foreign text (BENCHMARKS.md, cross-domain)
    holdout: float = 0.25
    # D above: how far either side of `ridge` the held-out choice looks. 2 by default: with 4, no projection of
    # SmolLM2-135M or Gemma-3-270M chose a ridge outside 10^-2..10^2 in nine cells (BENCHMARKS.md, cross-domain)
    decades: int = 2

    def __post_init__(self) -> None:
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must lie in [0, 1), got {self.holdout}")
        if self.decades < 0:
            raise ValueError(f"decades must be >= 0, got {self.decades}")


ALLOCATIONS: dict[str, type] = {"uniform": NoSettings, "log": NoSettings, "global": GlobalAllocation,
                                "search": ProfileSearch}
COMPENSATIONS: dict[str, type] = {"none": NoSettings, "bias": NoSettings, "lstsq": LeastSquares}


def parse_allocation(spec: str) -> tuple[str, NoSettings | GlobalAllocation | ProfileSearch]:
    """`uniform`, `log`, `global[:floor=F][:attention_weight=W]` or `search[:floor=F][:generations=G]...`
    (`pruning.search`)."""
    return parse_spec(spec, ALLOCATIONS, "allocation")


def parse_compensation(spec: str) -> tuple[str, NoSettings | LeastSquares]:
    """`none`, `bias` or `lstsq[:ridge=R][:holdout=H][:decades=D]`."""
    return parse_spec(spec, COMPENSATIONS, "compensation")
