"""Issue 17's cross-domain protocol from `hywia bench` runs that differ only in their calibration source: each run's
table (in-domain texts marked, `cross gm` over the others), and one table that compares the sources on the texts
that are foreign to all of them. Writes benchmarks/results/crossdomain-bench.json and .md.

    for source in lambada wiki mix; do
        hywia bench --calib $source --ratios 0.2,0.5 --tasks none --ppl-tokens 4096 --out-dir bench-$source \
            --criteria 'hywia,flap@compensate=bias,...'
    done
    python benchmarks/crossdomain_summary.py bench-lambada/bench.json bench-wiki/bench.json bench-mix/bench.json

A bench stopped before its last run still has every finished run in its bench.json: those rows are shown.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from hywia.bench.report import _table, cross_domain_texts, in_domain_texts

RESULTS = Path(__file__).resolve().parent / "results"


def foreign_texts(records: list[dict]) -> list[str]:
    """The measured texts that are in-domain for none of the runs' calibration sources."""
    texts = records[0]["settings"]["ppl_texts"]
    return [text for text in texts if all(text not in in_domain_texts(record) for record in records)]


def geometric_mean(evaluation: dict, texts: list[str]) -> float:
    return math.exp(sum(math.log(evaluation["perplexity"][text]["ppl"]) for text in texts) / len(texts))


def run_label(run: dict) -> str:
    """The run's label, with the fusion's views and learning steps when the label does not give them: a bare `hywia`
    hides which views were blended (the default changed in the twelfth session) and whether the blend was learned
    (and for how long) or equal, and benches of different sessions sit side by side."""
    fusion = run["report"].get("fusion") or {}
    criterion, _, options = run["label"].partition("@")
    name, *settings = criterion.split(":")
    first = []  # views, then steps: as the label gives them, else as the run recorded them
    for key in ("views", "steps"):
        given = [setting for setting in settings if setting.startswith(f"{key}=")]
        recorded = fusion.get(key)
        if not given and recorded is not None:
            given = [f"{key}={'+'.join(recorded) if isinstance(recorded, list) else recorded}"]
        first += given
    rest = [setting for setting in settings if setting not in first]
    return ":".join([name, *first, *rest]) + (f"@{options}" if options else "")


def summarise(records: list[dict], names: list[str]) -> dict:
    """Per (criterion entry, ratio): the geometric mean over the foreign texts under each bench (`names`: one per
    record, e.g. its calibration source)."""
    foreign = foreign_texts(records)
    rows: dict[tuple[str, float], dict[str, float]] = {}
    for record, source in zip(records, names):
        rows.setdefault(("dense", 0.0), {})[source] = geometric_mean(record["dense"], foreign)
        for run in record["runs"]:
            rows.setdefault((run_label(run), run["ratio"]), {})[source] = geometric_mean(run["eval"], foreign)
    return {"foreign_texts": foreign, "sources": names,
            "rows": [{"label": label, "ratio": ratio, "gm": gm} for (label, ratio), gm in rows.items()]}


def _ranking(summary: dict) -> list[str]:
    """Benches of one calibration source: every run once per bench, by ratio, best first."""
    rows = sorted(((row["ratio"], gm, row["label"], bench) for row in summary["rows"] for bench, gm in row["gm"].items()
                   if row["label"] != "dense"), key=lambda r: (r[0], r[1]))
    dense = next(iter(next(r for r in summary["rows"] if r["label"] == "dense")["gm"].values()))
    return [f"Geometric-mean perplexity on the texts foreign to the calibration source "
            f"({', '.join(summary['foreign_texts'])}), every run of every bench, best first per ratio "
            f"(dense: {dense:.2f}):", "", "| ratio | run | cross gm | bench |", "|---|---|---|---|",
            *(f"| {ratio:g} | `{label}` | {gm:.2f} | `{bench}` |" for ratio, gm, label, bench in rows)]


def render(records: list[dict], summary: dict, paths: list[str]) -> str:
    sources = summary["sources"]
    if len({record["settings"]["calibration"]["source"] for record in records}) == 1 and len(records) > 1:
        lines = _ranking(summary)
    else:
        lines = [f"Geometric-mean perplexity on the texts foreign to every source "
                 f"({', '.join(summary['foreign_texts'])}), per bench (named by its file; - = not run or not reached):",
                 "", "| run | ratio | " + " | ".join(f"`{s}`" for s in sources) + " |",
                 "|---|---|" + "---|" * len(sources)]
        for row in summary["rows"]:
            cells = [f"{row['gm'][s]:.2f}" if s in row["gm"] else "-" for s in sources]
            lines.append(f"| `{row['label']}` | {row['ratio']:g} | " + " | ".join(cells) + " |")
    for record, path in zip(records, paths):
        calibration = record["settings"]["calibration"]
        lines += ["", f"#### Calibration `{calibration['source']}`: {calibration['samples']} windows x "
                      f"{calibration['seq_len']} tokens of {calibration['text']}", "",
                  f"From `{path}`; command: `{record.get('command', '')}`. cross gm = geometric mean over "
                  f"{', '.join(cross_domain_texts(record))} (every text but the in-domain ones).", "",
                  *_table(record)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benches", nargs="+", help="bench.json files of runs with different --calib")
    parser.add_argument("--name", default="crossdomain-bench")
    args = parser.parse_args()
    records = [json.loads(Path(path).read_text()) for path in args.benches]
    summary = summarise(records, [Path(path).stem for path in args.benches])
    text = render(records, summary, args.benches)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"benches": args.benches, **summary}, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
