#!/usr/bin/env bash
# Every GPU figure of issue #16, in two calls of the device tool (10 minutes each at most), over the
# data that ../shared/tools/gpu-data carries. NOT YET RUN ON A GPU: written and run on a CPU only at
# toy sizes (SMOKE=1; tests/test_gpu_report.py runs the dice phase), so expect to adjust it on the
# first GPU session, and time the phases there before trusting them to fit 10 minutes.
#   call 1 (carry .gpudata/a):  mkdir -p /root/data && cp -r .gpudata/a/. /root/data/
#   call 2 (carry .gpudata/b):  cp -r .gpudata/b/. /root/data/ && bash bench/gpu_report.sh speed /root/data
#   call 3 (warm, same data):   bash bench/gpu_report.sh dice /root/data
# Each phase appends its log to $OUT/gpu_<phase>.txt (OUT defaults to ./gpu-report): device, every
# command, and its result lines.
set -euo pipefail
phase=${1:?"usage: gpu_report.sh speed|dice DATA_DIR"}
data=${2:?"usage: gpu_report.sh speed|dice DATA_DIR"}
out=${OUT:-gpu-report}  # logs and the comparison figure: what comes back from the device
runs=${RUNS:-/tmp/gpu-runs}  # the runs' own folders stay on the machine
py=${PYTHON:-python3}
mkdir -p "$out" "$runs"
log="$out/gpu_$phase.txt"
export PYTHONUNBUFFERED=1
if [ "${SMOKE:-0}" = 1 ]; then  # toy sizes, so that the CPU test runs in seconds
    size=32 width=4 epochs=1 cv_epochs=1 steps=1 warmup=1 repeats=1 batches="8" workers=1 limit="--limit 60"
else
    size=256 width=32 epochs=20 cv_epochs=60 steps=30 warmup=10 repeats=3 batches="16 32 64" workers=8 limit=""
fi
bench=("$py" bench/bench.py --data-dir "$data" --image-size "$size" --base-width "$width" --steps "$steps"
       --warmup "$warmup" --repeats "$repeats" --workers "$workers")
script=("$py" brain_tumor_segmentation.py --data-dir "$data/brain-tumor-segmentation" --image-size "$size"
        --base-width "$width" --test-samples 4 $limit)

say() { echo "$*" | tee -a "$log"; }
run() {  # the command, then its output without progress bars
    say "\$ $*"
    local start=$SECONDS
    "$@" 2>&1 | tr '\r' '\n' | grep -v -E "it/s|img/s\]|^\s*$" | tee -a "$log"
    say "($((SECONDS - start)) s wall)"
}

say "== $phase, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
command -v nvidia-smi >/dev/null && nvidia-smi -L | tee -a "$log" || say "no nvidia-smi: $(uname -m) CPU"

case $phase in
speed)
    # Batch size x compile, the fast path alone; then the seed's DataLoader loops once, at batch 32.
    for batch in $batches; do
        for compile in off on; do
            run "${bench[@]}" --batch-size "$batch" --compile "$compile" --no-seed-loops
        done
    done
    top=${batches##* }
    run "${bench[@]}" --batch-size "$top" --compile on --compile-mode reduce-overhead --no-seed-loops
    run "${bench[@]}" --batch-size "$top" --compile on --compile-mode max-autotune --no-seed-loops
    run "${bench[@]}" --batch-size "$top" --compile on --no-channels-last --no-seed-loops
    run "${bench[@]}" --batch-size "${batches%% *}" --compile auto --seed-loops
    # The whole default run, start to finish (load, compile, train, validate, plots, test).
    run "${script[@]}" --epochs "$epochs" --out-dir "$runs/full-run" --overwrite
    ;;
dice)
    # Both recipes, 20 epochs, patient split, seeds 1 and 2; then the longer setting as 5-fold CV.
    for seed in 1 2; do
        for recipe in improved seed; do
            run "${script[@]}" --epochs "$epochs" --recipe "$recipe" --seed "$seed" --out-dir "$runs/dice/$recipe-$seed" --overwrite
        done
    done
    run "$py" brain_tumor_segmentation.py compare "$runs/dice/improved-1" "$runs/dice/seed-1" "$runs/dice/improved-2" \
        "$runs/dice/seed-2" --out "$out/dice_comparison.png"
    run "${script[@]}" --epochs "$cv_epochs" --folds 5 --out-dir "$runs/cv" --overwrite
    ;;
*)
    echo "unknown phase $phase: speed or dice" >&2
    exit 2
    ;;
esac
