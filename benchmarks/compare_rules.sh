#!/usr/bin/env bash
# `fedspeech compare` across random init, centralised SSL and federated SSL under several
# aggregation rules, in the reference study's two settings (10 clients all per round; 100
# clients, 20 per round), on every task. Behind docs/evaluation.md ("Comparing backbones").
# Usage: bash benchmarks/compare_rules.sh [OUT] [ROUNDS] [STEPS]   (~35 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/compare-rules}
ROUNDS=${2:-4}
STEPS=${3:-100}
FS=".venv/bin/fedspeech --threads 1"
mkdir -p "$OUT"
# 130 speakers: 104 training speakers, enough for 100 speaker-disjoint clients.
[ -f "$OUT/corpus/manifest.tsv" ] || $FS corpus synth --out "$OUT/corpus" --speakers 130 --seed 0 \
  --keywords-per-speaker 8 --sentences-per-speaker 3
for n in 10 100; do
  [ -f "$OUT/partition$n.json" ] || $FS partition --manifest "$OUT/corpus/manifest.tsv" --clients $n \
    --scheme speaker --seed 0 --out "$OUT/partition$n.json"
done
pretrain() {  # NAME PRESET CLIENTS extra flags...
  local name=$1 preset=$2 clients=$3; shift 3
  [ -f "$OUT/$name/rounds.jsonl" ] && [ -d "$OUT/$name/checkpoints/round_$(printf %04d "$ROUNDS")" ] && return 0
  $FS pretrain --manifest "$OUT/corpus/manifest.tsv" --partition "$OUT/partition$clients.json" --preset "$preset" \
    --model tiny --rounds "$ROUNDS" --max-seconds 1.5 --lr 0.002 --warmup-rounds 1 --batch-size 4 --out "$OUT/$name" "$@" \
    > "$OUT/$name.log" 2>&1
}
# two at a time: one torch thread each on the 2 cores
pretrain gao10-fedavg gao10 10 --strategy fedavg & pretrain gao10-ldawa gao10 10 --strategy ldawa & wait
pretrain gao10-loss gao10 10 --strategy loss & pretrain centralised gao10 10 --centralised & wait
pretrain gao100-fedavg gao100 100 --strategy fedavg & pretrain gao100-ldawa gao100 100 --strategy ldawa & wait
# one fine-tuning recipe for every backbone; the CNN is fine-tuned too (fair to random init)
$FS compare --manifest "$OUT/corpus/manifest.tsv" --tasks kws,speaker,asr --max-steps "$STEPS" --epochs 1000 \
  --lr-backbone 3e-4 --lr-head 2e-3 --no-freeze-cnn --out "$OUT/compare" \
  --backbone random=tiny --backbone centralised="$OUT/centralised" \
  --backbone gao10-fedavg="$OUT/gao10-fedavg" --backbone gao10-loss="$OUT/gao10-loss" \
  --backbone gao10-ldawa="$OUT/gao10-ldawa" --backbone gao100-fedavg="$OUT/gao100-fedavg" \
  --backbone gao100-ldawa="$OUT/gao100-ldawa"
for run in centralised gao10-fedavg gao10-loss gao10-ldawa gao100-fedavg gao100-ldawa; do
  printf '%-15s val loss by round: ' "$run"
  .venv/bin/python -c "import json,sys; print(' '.join(f\"{json.loads(l)['val_loss']:.3f}\" for l in open(sys.argv[1])))" "$OUT/$run/rounds.jsonl"
done
