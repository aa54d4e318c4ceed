#!/usr/bin/env bash
# The GPU figures, planned for the time a lent GPU gives (15 minutes in all, start-up included; one
# call at most 10 minutes). First run on an H200 on 2026-12-04 (bench/RESULTS.md): the speed phase
# took 183 s, the default 20-epoch run 66 s, start-up about 30 s.
#
# The call plan (the data, ../shared/data, travels in two halves: bash ../shared/tools/gpu-data;
# the machine stays warm only 30 s between calls, so make them back to back). The machine's Python
# lacks torchsummary: carry its wheel (.whl, see the device README) and install it to /tmp/site.
#   call 1, about 4 min with start-up:  carry [".gpudata/a", ".whl"]
#       mkdir -p /root/data && cp -r .gpudata/a/. /root/data/ && OUT=$OUT bash bench/gpu_report.sh speed /root/data
#     a step under CUDA's sync check; steady-state speed at batch 16 and 32 with compile off and on,
#     the seed loop in the same call (the first half of the data is enough for all of them)
#   call 2, about 2 min:  carry [".gpudata/b", ".whl"]
#       cp -r .gpudata/b/. /root/data/ && OUT=$OUT bash bench/gpu_report.sh run /root/data
#     the default 20-epoch run start to finish with its test Dice
#   call 3, about 6 min (warm, same data):  OUT=$OUT bash bench/gpu_report.sh extra /root/data
#     both recipes on seeds 1 and 2 (the same test images) and `compare`; then CUDA graphs
#     (reduce-overhead) and channels-first at batch 32
# `core` is `speed` then `run` in one call.
#
# Every command is logged with its output and exit code into $OUT/gpu_<phase>.txt; a command that
# fails is recorded and the next one still runs. The script exits 1 if any command failed.
set -u
phase=${1:?"usage: gpu_report.sh core|speed|run|extra DATA_DIR"}
data=${2:?"usage: gpu_report.sh core|speed|run|extra DATA_DIR"}
out=${OUT:-gpu-report}  # logs and figures: what comes back from the device
runs=${RUNS:-/tmp/gpu-runs}/$phase-$(date +%Y%m%d-%H%M%S)  # the runs' own (new) folders stay on the machine
py=${PYTHON:-python3}
mkdir -p "$out" "$runs"
log="$out/gpu_$phase.txt"
export PYTHONUNBUFFERED=1
if [ "${SMOKE:-0}" = 1 ]; then  # toy sizes, so that a CPU runs the whole plan in a minute
    size=32 width=4 epochs=1 steps=1 repeats=1 batches="8" limit="--limit 60" on=off workers=2 matmul=0.1
else
    size=256 width=32 epochs=20 steps=20 repeats=3 batches="16 32" limit="" on=on workers=8 matmul=2
fi  # SMOKE compiles nothing (a CPU compile takes a minute)
bench=("$py" bench/bench.py --data-dir "$data" --image-size "$size" --base-width "$width" --steps "$steps"
       --repeats "$repeats" --matmul-seconds "$matmul")
script=("$py" brain_tumor_segmentation.py --data-dir "$data/brain-tumor-segmentation" --image-size "$size"
        --base-width "$width" --test-samples 4 $limit)
failed=0 total=0

say() { echo "$*" | tee -a "$log"; }
run() {  # the command and its output (progress bars left out), then its exit code; never stops the report
    say "\$ $*"
    local start=$SECONDS
    "$@" > >(tr '\r' '\n' | grep -v -E "it/s|img/s\]|^\s*$" | tee -a "$log") 2>&1
    local rc=$?
    wait
    total=$((total + 1))
    [ $rc -ne 0 ] && failed=$((failed + 1))
    say "(exit $rc, $((SECONDS - start)) s wall)"
}

say "== $phase, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if command -v nvidia-smi >/dev/null; then nvidia-smi -L | tee -a "$log"; else say "no nvidia-smi: $(uname -m) CPU"; fi

case $phase in
core|speed|run)
  if [ "$phase" != run ]; then
    # No step may wait for the GPU (the loss check aside, every nan_check_every steps).
    run "$py" - "$data/brain-tumor-segmentation" "$size" <<'EOF'
import sys, torch, brain_tumor_segmentation as bts
if not torch.cuda.is_available():
    sys.exit(print("no CUDA here: the sync check needs a GPU; skipped") or 0)
cfg, _ = bts.config_from_args(["--image-size", sys.argv[2], "--compile", "off", "--nan-check-every", "1000"])
machine = bts.set_up_machine(cfg)
data = bts.load_dataset(sys.argv[1], cfg.image_size, limit=64)
split = {"train": data["names"], "val": [], "test": [], "files": data["hashes"], "unit": "images"}
idx = {"train": torch.arange(64), "val": torch.arange(0), "test": torch.arange(0)}
run = bts.build_run(cfg, machine, data, split, idx, None)
bts.train_epoch(run)  # warm: cuDNN autotuning may sync
run.epoch, cfg.nan_check_every = 0, 1000
torch.cuda.set_sync_debug_mode("error")
bts.train_epoch(run)
print("a training epoch ran under set_sync_debug_mode('error') without waiting for the GPU")
EOF
    for batch in $batches; do
        run "${bench[@]}" --batch-size "$batch" --compile off --no-seed-loops
        run "${bench[@]}" --batch-size "$batch" --compile "$on" --no-seed-loops
    done
    run "${bench[@]}" --batch-size "${batches%% *}" --compile off --seed-loops --workers "$workers"
  fi
  if [ "$phase" != speed ]; then
    # The whole default run, start to finish (load, compile, train, validate, plots, test).
    run "${script[@]}" --epochs "$epochs" --out-dir "$runs/default"
  fi
    ;;
extra)
    for seed in 1 2; do
        for recipe in improved seed; do
            run "${script[@]}" --epochs "$epochs" --recipe "$recipe" --seed "$seed" \
                --out-dir "$runs/recipes/$recipe-$seed"
        done
    done
    run "$py" compare.py "$runs/recipes/improved-1" "$runs/recipes/improved-2" "$runs/recipes/seed-1" \
        "$runs/recipes/seed-2" --out "$out/recipes"
    top=${batches##* }
    run "${bench[@]}" --batch-size "$top" --compile "$on" --compile-mode reduce-overhead --no-seed-loops
    run "${bench[@]}" --batch-size "$top" --compile "$on" --no-channels-last --no-seed-loops
    ;;
*)
    echo "unknown phase $phase: core (= speed, then run) or extra" >&2
    exit 2
    ;;
esac
say "== $phase done: $failed of $total commands failed"
[ $failed -eq 0 ]
