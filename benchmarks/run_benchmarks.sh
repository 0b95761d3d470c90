#!/usr/bin/env bash
# The numbers of docs/performance.md (the README's performance section), re-runnable on any machine:
#
#   benchmarks/run_benchmarks.sh                 # CPU, results in results/perf
#   OUT=results/perf-gpu DEVICE=cuda THREADS= benchmarks/run_benchmarks.sh
#
# Random SAM weights: speed and memory do not depend on the weights. Every ratio is measured within one
# `samfit bench` process (configurations interleaved round-robin) or, for the cache, two runs of the same
# command back to back. THREADS=1 by default: on a small CPU shared with other work, two OpenMP threads wait
# for each other whenever one is descheduled (3-4x slower steps here at load ~4 on 2 cores); set THREADS= to
# use torch's default.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-results/perf}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-2}
DEVICE=${DEVICE:-cpu}
THREADS=${THREADS-1}
SAMFIT=${SAMFIT:-.venv/bin/samfit}
PY=${PY:-.venv/bin/python}
threads=()
[ -n "$THREADS" ] && threads=(--threads "$THREADS")
mkdir -p "$OUT"
uptime | tee "$OUT/load_start.txt"

# ViT-B, 256 px, batch 2: every method, ratios to LoRA; plus the data pipeline's images/s
"$SAMFIT" bench --methods all --model vit_b --image-size 256 --batch 2 --steps "$STEPS" --warmup "$WARMUP" \
  --device "$DEVICE" "${threads[@]}" --data shapes --num-workers 2 --out "$OUT/vitb256"

# ViT-B, 512 px, batch 1: LoRA with sdpa / reference attention, with and without activation checkpointing
"$SAMFIT" bench --methods lora --model vit_b --image-size 512 --batch 1 --steps "$STEPS" --warmup "$WARMUP" \
  --device "$DEVICE" "${threads[@]}" --attention sdpa,reference --compare-grad-checkpoint --out "$OUT/vitb512"

# ViT-B, 256 px, batch 2: LoRA in every block vs LoRA in the last 3, each with and without the prefix cache
"$SAMFIT" bench --methods lora,lora@last:3 --compare-cache --model vit_b --image-size 256 --batch 2 --steps "$STEPS" \
  --warmup "$WARMUP" --device "$DEVICE" "${threads[@]}" --out "$OUT/vitb256_prefix"

# ViT-B, 256 px, batch 2: full fine-tuning with and without activation checkpointing
"$SAMFIT" bench --methods full --model vit_b --image-size 256 --batch 2 --steps "$STEPS" --warmup "$WARMUP" \
  --device "$DEVICE" "${threads[@]}" --compare-grad-checkpoint --out "$OUT/vitb256_full_ckpt"

# decoder-only epochs with and without the embedding cache (samfit run, CPU)
"$PY" benchmarks/bench_cache.py --out "$OUT/cache" ${THREADS:+--threads "$THREADS"}

# the three exact attention forms per call (forward + backward), ViT-B shapes
"$PY" benchmarks/bench_attention_forms.py ${THREADS:+--threads "$THREADS"} | tee "$OUT/attention_forms.md"

uptime | tee "$OUT/load_end.txt"
"$PY" benchmarks/bench_summary.py "$OUT"
