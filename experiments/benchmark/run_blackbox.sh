#!/usr/bin/env bash
# Trains and evaluates every black-box oracle arm, two jobs at a time, one thread each:
#   bash experiments/benchmark/run_blackbox.sh [SEEDS...]        (default seeds: 0 1 2)
# Then: python experiments/benchmark/blackbox.py report multirun/bb --out experiments/results/blackbox
# Each job trains into multirun/bb/<arm>/seed<s>/ and evaluates its checkpoint on the 40 held-out
# prompts (blackbox_eval.json); a finished job is skipped on a rerun. About 3.5 hours for every
# arm and three seeds on 2 cores (sample-scored arms ~20 min a job, generative ~10, DPO ~4).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
SEEDS=("${@:-0 1 2}")
ARMS=(bb_sample_expected bb_generative bb_dpo bb_sample_scored bb_antithetic bb_judged_pairs bb_batched)
mkdir -p multirun/bb/logs
python experiments/benchmark/blackbox.py eval --base-only >multirun/bb/logs/base.log 2>&1
# Arms in order of priority, seeds inside: the best design and the reference get all seeds first.
jobs=()
for arm in "${ARMS[@]}"; do
    for seed in ${SEEDS[*]}; do jobs+=("$arm $seed"); done
    [ "$arm" = bb_dpo ] && jobs+=("bb_paper 0")
done
run_job() {
    local arm=$1 seed=$2 dir="multirun/bb/${1#bb_}/seed$2"
    if [ -f "$dir/blackbox_eval.json" ] || { [ -f "$dir/metrics.json" ] && [ ! -d "$dir/checkpoint" ] && grep -q run.seconds "$dir/metrics.json"; }; then
        return 0
    fi
    compo +experiment="$arm" seed="$seed" hydra.run.dir="$dir" >"multirun/bb/logs/${arm}_$seed.log" 2>&1
    if [ -d "$dir/checkpoint" ]; then
        python experiments/benchmark/blackbox.py eval "$dir" >>"multirun/bb/logs/${arm}_$seed.log" 2>&1
    fi
    echo "$(date +%T) done $arm seed $seed (load: $(cut -d' ' -f1-3 /proc/loadavg))"
}
export -f run_job
printf '%s\n' "${jobs[@]}" | xargs -P 2 -L 1 bash -c 'run_job "$0" "$1"'
