"""Dense vs 20% and 50% pruned (and 50% at round-to 8 and 64), SmolLM2-135M and a LLaMA-7B-shaped stack: prefill
and decode speed-ups against their MAC ceilings. Writes benchmarks/results/speed.json and speed.md.

    python benchmarks/speed.py        # the defaults of benchmarks/harness/speed.py's SpeedSettings
    python benchmarks/speed.py --shapes smollm2-135m --ratios none --plans out-a/report.json,out-b/report.json \
        --name speed-default          # the widths of real prunes instead, written as speed-default.json/.md
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pool

from harness.speed import (  # noqa: E402
    add_speed_flags,
    command_line,
    render_markdown,
    run_speed,
    settings_from_args,
)
from hywia.errors import HywiaError  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_speed_flags(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="speed", help="results are written as NAME.json and NAME.md [speed]")
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        extra = [] if args.name == "speed" else ["--name", args.name]
        record = run_speed(settings, RESULTS, command_line(["python", "benchmarks/speed.py"], settings, extra=extra),
                           args.name)
    except HywiaError as exc:
        print(f"speed.py: error: {exc}", file=sys.stderr)
        return 2
    print(render_markdown(record))
    print(f"written: {RESULTS / (args.name + '.json')}, {RESULTS / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
