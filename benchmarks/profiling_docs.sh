#!/usr/bin/env bash
# Re-run every command whose output docs/profiling.md shows; outputs land in ${OUT:-runs/profiling_docs}.
# About 30-40 minutes on one thread of a 2-core machine. Usage: bash benchmarks/profiling_docs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/profiling_docs}
mkdir -p "$OUT"
FS=".venv/bin/fedspeech"
run() { local name=$1; shift; echo "== $name: fedspeech $*"; { echo "\$ fedspeech $*"; "$FS" "$@"; } > "$OUT/$name.txt" 2>&1; tail -n 3 "$OUT/$name.txt"; }

run tiny       profile --model tiny  --seconds 5 --batch 1 --threads 1 --repeats 0 --json "$OUT/tiny.json"
run base_sweep profile --model base  --seconds 5 --batch 1 --threads 1 --sweep-seconds 1,2,4,8,12,16,20 \
                       --json "$OUT/base.json" --plots docs/img/profiling
run large      profile --model large --seconds 5 --batch 1 --threads 1 --json "$OUT/large.json" --plots docs/img/profiling
for model in base large; do
    for convention in complete gao2022; do
        run "conv_${model}_$convention" profile --model "$model" --seconds 5.5 --batch 1 --threads 1 --repeats 0 \
                       --convention "$convention" --json "$OUT/conv_${model}_$convention.json"
    done
done
run base_prec  profile --model base  --seconds 2 --batch 1 --threads 1 --compare-precision \
                       --json "$OUT/base_prec.json" --plots docs/img/profiling/precision
run base_savers profile --model base --seconds 5 --batch 1 --threads 1 \
                       --savers ckpt-cnn ckpt-transformer freeze-cnn crop=2 amp=bf16 \
                       --json "$OUT/base_savers.json" --plots docs/img/profiling
run feas_base  feasibility --model base --seconds 5.5 --batch 4 --all --threads 1 \
                       --utterances-per-client 1950 --clients 10 --rounds 150 --trend-months 18 --json "$OUT/feas_base.json"
run feas_large feasibility --model large --seconds 5.5 --batch 4 --all --threads 1 \
                       --utterances-per-client 1950 --clients 10 --rounds 150 --trend-months 18 --json "$OUT/feas_large.json"
echo "== prediction error"
.venv/bin/python benchmarks/prediction_error.py --threads 1 --clock cpu --json "$OUT/prediction.json" > "$OUT/prediction.txt" 2>&1
tail -n 40 "$OUT/prediction.txt"
