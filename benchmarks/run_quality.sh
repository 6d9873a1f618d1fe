#!/usr/bin/env bash
# Regenerates every number, table and plot of the quality section of BENCHMARKS.md:
# hywia's defaults against the peers at their own settings (LLM-Pruner's Taylor criteria and Wanda-sp: uniform,
# no compensation; FLAP: global allocation with bias compensation), x 2 ratios on the embedded SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), the same 64 calibration
# windows for every run, perplexity on 16k held-out tokens of LAMBADA and of CoQA, and the seven zero-shot tasks plus
# LAMBADA last-word accuracy (--tasks all) on fixed seed-0 subsets of 100 items each. An estimated 4 hours on a 2-core CPU (one thread), from four criteria at 50 items and
# 4096 tokens taking about 45 minutes.
#
#   benchmarks/run_quality.sh                          # writes benchmarks/quality/ and benchmarks/results/quality.md
#   benchmarks/run_quality.sh --prune-option allocation=global --out-dir /tmp/q --markdown /tmp/q/B.md
#
# Extra flags are appended, so they override the ones below. HYWIA=path/to/hywia picks the executable.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${HYWIA:-}" ]]; then
  if [[ -x .venv/bin/hywia ]]; then HYWIA=.venv/bin/hywia; else HYWIA=hywia; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=false

exec "$HYWIA" bench \
  --ratios 0.2,0.5 \
  --criteria hywia,taylor-element1@allocation=uniform@compensate=none,taylor-element2@allocation=uniform@compensate=none,taylor-vector@allocation=uniform@compensate=none,fixed:0.5@allocation=uniform@compensate=none,wanda-sp@allocation=uniform@compensate=none,flap@allocation=global:attention_weight=1@compensate=bias,taylor-element1,magnitude,random \
  --calib lambada --calib-samples 64 --seq-len 128 --seed 0 \
  --ppl-text lambada,coqa --ppl-tokens 16384 \
  --tasks all --limit 100 \
  --out-dir benchmarks/quality \
  --markdown benchmarks/results/quality.md \
  "$@"
