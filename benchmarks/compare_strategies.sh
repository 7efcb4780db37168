#!/usr/bin/env bash
# Example federated pretraining run behind docs/pretraining.md: the built-in corpus, the
# reference study's 10-client setting (all clients every round, 1 local epoch, batch 4),
# tiny wav2vec 2.0, one run per aggregation rule, and the feature-matching method with
# FedU; then the validation-loss plot. Usage: bash benchmarks/compare_strategies.sh [OUT] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/strategies}
ROUNDS=${2:-4}
FS=".venv/bin/fedspeech --threads 1"
mkdir -p "$OUT"
[ -f "$OUT/corpus/manifest.tsv" ] || $FS corpus synth --out "$OUT/corpus" --speakers 16 --seed 0 \
  --keywords-per-speaker 12 --sentences-per-speaker 6
$FS partition --manifest "$OUT/corpus/manifest.tsv" --clients 10 --scheme speaker --seed 0 \
  --out "$OUT/partition10.json"
common=(--manifest "$OUT/corpus/manifest.tsv" --partition "$OUT/partition10.json" --preset gao10
        --model tiny --rounds "$ROUNDS" --max-seconds 1.5 --lr 0.0005 --batch-size 4)
for rule in fedavg loss mixed ldawa; do
  [ -f "$OUT/$rule/rounds.jsonl" ] || $FS pretrain "${common[@]}" --strategy "$rule" --out "$OUT/$rule"
done
[ -f "$OUT/byol-fedu/rounds.jsonl" ] || $FS pretrain "${common[@]}" --method byol --strategy fedu --out "$OUT/byol-fedu"
[ -f "$OUT/centralised/rounds.jsonl" ] || $FS pretrain "${common[@]}" --centralised --out "$OUT/centralised"
$FS plot-rounds "$OUT"/fedavg "$OUT"/loss "$OUT"/mixed "$OUT"/ldawa "$OUT"/centralised \
  --labels FedAvg loss-weighted mixed L-DAWA centralised --out "$OUT/val_loss_wav2vec2.png"
