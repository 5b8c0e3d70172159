#!/usr/bin/env bash
# The Shapes incremental benchmark over (task, setting, method, seed), resumable: every run writes
# BENCH_DIR/results/TASK-SETTING-METHOD-sSEED.json (per-step reports, seed, budget, commit, machine,
# wall time, the exact commands) and a run whose result file exists is skipped. Logs, models and
# packs go to BENCH_DIR/work (not in git). How to run it and the order of the runs: docs/benchmark.md.
#   [TASKS="15-5 15-1"] [SETTINGS=overlap] [METHODS=...] [SEEDS="0 1 2"] [JOBS=nproc] bash tools/benchmark.sh
# METHODS: rows of `hrhf-distill --list-methods`, the variants below, or `main` (default: ft lwf mib
# plop gsc hrhf hrhf+gsc joint) and `ablations` (the 15-1 ablation rows). Variants:
#   hrhf-no-saa   hrhf with packs synthesised without Scale-Aware Aggregation (hrhf-synth --no-saa)
#   hrhf-real16   hrhf with 16 real images per batch (and 16 fake)
#   mib-batch16   MiB with 16 real images per batch (as many images as hrhf's 8 real + 8 fake)
#   hrhf-reached50  hrhf whose fake half draws only pack images that reached half of every asked
#                 area (hrhf-distill --fake-min-achieved 0.5): an experiment, not in `ablations`
#   hrhf-no-fake-ce  hrhf without the fake half's cross-entropy (--fake-ce 0; its KD stays): an experiment
# Budget (the defaults are the benchmark's; a different budget belongs in another BENCH_DIR):
#   ITERATIONS_15_5=400 ITERATIONS_PER_STEP=200 (15-1, 10-1) BATCH=8 LR=0.01 EVAL_LIMIT=200
#   PACK_COUNT=64 PACK_ITERATIONS=250 (the step-0 pack, one per seed) SYNTH_COUNT=16 SYNTH_ITERATIONS=150
#   (the pack made after each step of a multi-step run).
# Then tools/bench_report.py writes BENCH_DIR/report.md and the plots (docs/images for bench, else
# BENCH_DIR/images) from BENCH_DIR/results, and for bench README.md's result tables; PYTHON names a
# Python with matplotlib (default python3).
# Prints how many runs this pass has to do, a line per run as it ends ([k/N], elapsed, runs per hour,
# the time the rest should take), and ends with the summary table (all mIoU at each task's last step).
# BIN: binaries to use instead of building .build/release. COMMIT_RESULTS=1: commit each result file
# as it lands (BENCH_DIR inside this repository).
set -euo pipefail
cd "$(dirname "$0")/.."

main_methods="ft lwf mib plop gsc hrhf hrhf+gsc joint"
ablation_methods="hrhf+gsc-no-compensation hrhf+gsc-no-soft-sharp hrhf+gsc-no-relation hrhf+gsc-no-proto
  hrhf-no-saa hrhf+gsc-no-fake hrhf-real16 mib-batch16"
tasks=${TASKS:-15-5 15-1}
settings=${SETTINGS:-overlap}
methods=${METHODS:-main}
methods=${methods//ablations/$ablation_methods}
methods=${methods//main/$main_methods}
seeds=${SEEDS:-0 1 2}
jobs_max=${JOBS:-$(nproc)}
it155=${ITERATIONS_15_5:-400}
# 200 a step for 15-1: chosen on the held-out set (tools/tune.sh), where at 80 a step every
# method's newest classes stayed half-learned and the packs made from them rehearsed poor images.
itstep=${ITERATIONS_PER_STEP:-200}
batch=${BATCH:-8}
lr=${LR:-0.01}
eval_limit=${EVAL_LIMIT:-200}
pack_count=${PACK_COUNT:-64}
pack_iterations=${PACK_ITERATIONS:-250}
synth_count=${SYNTH_COUNT:-16}
synth_iterations=${SYNTH_ITERATIONS:-150}
dir=${BENCH_DIR:-bench}
results=$dir/results
work=$dir/work
mkdir -p "$results" "$work"

if [ -n "${BIN:-}" ]; then
  bin=$BIN
else
  bash tools/install-deps.sh
  swift build -c release
  bin=.build/release
fi
data=data/shapes
if [ ! -f $data/shapes.json ]; then
  "$bin/hrhf-data" shapes --out $data --train 4000 --val 500 --size 128 --seed 0
fi
known_methods=$("$bin/hrhf-distill" --list-methods | awk 'NR > 2 { print $1 }')
commit=$(git rev-parse --short HEAD)
# The commit that last changed the code (results committed as they land move HEAD, not the binary).
code_commit=$(git log -1 --format=%h -- Sources Package.swift)
git diff --quiet HEAD -- Sources Package.swift || code_commit="$code_commit+changes"
cpu=$(grep -m1 '^model name' /proc/cpuinfo | sed 's/^[^:]*: *//')
cores=$(nproc)
# The widest vector unit the CPU offers: OpenBLAS picks its kernels (and their summation order) by it.
simd=baseline
grep -qw avx2 /proc/cpuinfo && simd=avx2
grep -qw avx512f /proc/cpuinfo && simd=avx512

# The step-0 model of a task and setting (a disjoint step 0 never saw an image holding a later class;
# 15-5 and 15-1 share theirs), its classes, and the last step, of each task.
task_model() {  # task setting
  local base=15-5
  [ "$1" = 10-1 ] && base=10-1
  echo "zoo/shapes-$base$(setting_tag "$2")-step0.safetensors"
}
setting_tag() { [ "$1" = overlap ] || echo "-$1"; }  # in the names of a setting's zoo model and packs
task_base() { case $1 in 10-1) echo 1-10 ;; *) echo 1-15 ;; esac; }
task_last() {
  case $1 in 15-5) echo 1 ;; 15-1) echo 5 ;; 10-1) echo 10 ;; *) echo "unknown task $1" >&2; return 1 ;; esac
}

# A row's hrhf-distill method and extra options; sets method, row_batch, saa (synthesis option), extra
# (distillation options) and packs_needed.
row_spec() {
  method=$1 row_batch=$batch saa=() extra=()
  case $1 in
    hrhf-no-saa) method=hrhf saa=(--no-saa) ;;
    hrhf-real16) method=hrhf row_batch=16 ;;
    mib-batch16) method=mib row_batch=16 ;;
    hrhf-reached50) method=hrhf extra=(--fake-min-achieved 0.5) ;;
    hrhf-no-fake-ce) method=hrhf extra=(--fake-ce 0) ;;
  esac
  case $method in hrhf* | gsc*) packs_needed=1 ;; *) packs_needed=0 ;; esac
}

# The step-0 pack of a task's base classes for a seed, made once (runs that need it wait on its lock).
ensure_pack() {  # pack base-classes model seed [synthesis options...]
  local pack=$1 classes=$2 model=$3 seed=$4; shift 4
  (
    flock -x 9
    [ -f "$pack" ] && exit 0
    local cmd=("$bin/hrhf-synth" --model "$model" --classes "$classes" --count "$pack_count"
      --synth-iterations "$pack_iterations" --seed "$seed" "$@" --threads 1 --resume --out "$pack")
    echo "${cmd[*]}" > "$pack.command"
    "${cmd[@]}" > "${pack%.tar}.log" 2>&1 || { echo "pack failed: see ${pack%.tar}.log" >&2; exit 1; }
  ) 9> "$pack.lock"
}

# One run: distillation from the step-0 model through the task's last step, then the result file.
run() {  # task setting row seed
  local task=$1 setting=$2 row=$3 seed=$4
  local name="$task-$setting-$row-s$seed"
  local result="$results/$name.json" rundir="$work/$name"
  [ -f "$result" ] && return 0
  local method row_batch saa extra packs_needed
  row_spec "$row"
  if ! grep -qxF -- "$method" <<< "$known_methods"; then
    echo "$name: skipped, $method is not a method of this build (hrhf-distill --list-methods)"
    return 0
  fi
  local model last its
  model=$(task_model "$task" "$setting") last=$(task_last "$task")
  [ -f "$model" ] || { echo "$name: $model is missing (see docs/benchmark.md)"; return 1; }
  its=$itstep
  [ "$task" = 15-5 ] && its=$it155
  local packs=() pack_command=""
  if [ "$packs_needed" = 1 ]; then
    local pack="$work/pack-$(task_base "$task")$(setting_tag "$setting")${saa:+-no-saa}-s$seed.tar"
    ensure_pack "$pack" "$(task_base "$task")" "$model" "$seed" "${saa[@]}" || return 1
    packs=(--pack "$pack") pack_command=$(cat "$pack.command")
  fi
  mkdir -p "$rundir"
  local resumed=false
  compgen -G "$rundir/model*" > /dev/null && resumed=true
  local cmd=("$bin/hrhf-distill" --old "$model" "${packs[@]}" --data $data --dataset shapes --setting "$setting"
    --task "$task" --step 1 --last-step "$last" --method "$method" --iterations "$its" --batch "$row_batch"
    --lr "$lr" --seed "$seed" --synth-count "$synth_count" --synth-iterations "$synth_iterations" "${saa[@]}"
    "${extra[@]}"
    --eval-limit "$eval_limit" --threads 1 --out "$rundir/model.safetensors" --json "$rundir/steps.json")
  local start=$SECONDS
  "${cmd[@]}" >> "$rundir/log" 2>&1 || { echo "$name failed: see $rundir/log"; return 1; }
  # Steps an interrupted earlier attempt finished are not evaluated again by hrhf-distill: score their models.
  local s missing
  missing=$(python3 -c 'import json, sys
have = {r["step"] for r in json.load(open(sys.argv[1]))}
print(" ".join(str(s) for s in range(1, int(sys.argv[2]) + 1) if s not in have))' "$rundir/steps.json" "$last")
  for s in $missing; do
    local step_model="$rundir/model-step$s.safetensors"
    [ "$s" = "$last" ] && step_model="$rundir/model.safetensors"
    "$bin/hrhf-eval" --model "$step_model" --data $data --dataset shapes --setting "$setting" --task "$task" \
      --step "$s" --limit "$eval_limit" --threads 1 --json "$rundir/eval-step$s.json" >> "$rundir/log" 2>&1 ||
      { echo "$name: evaluating step $s failed: see $rundir/log"; return 1; }
  done
  local wall=$((SECONDS - start))
  RESULT=$result RUNDIR=$rundir TASK=$task SETTING=$setting ROW=$row SEED=$seed LAST=$last ITS=$its \
    ROW_BATCH=$row_batch LR=$lr EVAL_LIMIT=$eval_limit PACK_IMAGES=$((packs_needed * pack_count)) \
    PACK_ITERATIONS=$pack_iterations SYNTH_COUNT=$synth_count SYNTH_ITERATIONS=$synth_iterations COMMIT=$commit \
    CODE_COMMIT=$code_commit \
    CPU=$cpu SIMD=$simd CORES=$cores JOBS_MAX=$jobs_max WALL=$wall RESUMED=$resumed COMMAND="${cmd[*]}" \
    PACK_COMMAND=$pack_command python3 - <<'EOF' || { echo "$name: writing $result failed"; return 1; }
import json, os
e = os.environ
steps = {r["step"]: r for r in json.load(open(os.path.join(e["RUNDIR"], "steps.json")))}
for s in range(1, int(e["LAST"]) + 1):
    if s not in steps:
        steps[s] = json.load(open(os.path.join(e["RUNDIR"], f"eval-step{s}.json")))
record = {
    "task": e["TASK"], "setting": e["SETTING"], "method": e["ROW"], "seed": int(e["SEED"]),
    "budget": {
        "iterations_per_step": int(e["ITS"]), "batch": int(e["ROW_BATCH"]), "lr": float(e["LR"]),
        "eval_images": int(e["EVAL_LIMIT"]), "pack_images": int(e["PACK_IMAGES"]),
        "pack_iterations": int(e["PACK_ITERATIONS"]), "step_pack_images": int(e["SYNTH_COUNT"]),
        "step_pack_iterations": int(e["SYNTH_ITERATIONS"]), "threads": 1,
    },
    "commit": e["COMMIT"], "code_commit": e["CODE_COMMIT"], "machine": {
        "cpu": e["CPU"], "simd": e["SIMD"], "cores": int(e["CORES"]), "parallel_runs": int(e["JOBS_MAX"]),
    },
    "wall_seconds": int(e["WALL"]), "resumed": e["RESUMED"] == "true",
    "command": e["COMMAND"], "pack_command": e["PACK_COMMAND"] or None,
    "steps": [steps[s] for s in sorted(steps)],
}
partial = e["RESULT"] + ".partial"
with open(partial, "w") as f:
    json.dump(record, f, indent=1, sort_keys=True)
    f.write("\n")
os.replace(partial, e["RESULT"])
EOF
  local final
  final=$(python3 -c 'import json, sys
print("%.1f" % (100 * json.load(open(sys.argv[1]))["steps"][-1]["all"]))' "$result")
  echo "$(progress) $name: all mIoU $final % after step $last, $wall s"
  if [ "${COMMIT_RESULTS:-0}" = 1 ]; then
    (flock -x 9; git add -f "$result" && git commit -q -m "bench: $name" -- "$result") 9> "$work/git.lock"
  fi
}

failed=$work/failed-runs
: > "$failed"
finished=$work/finished-runs  # one line per run of this pass that ended, for the progress count
: > "$finished"
hms() { printf '%d:%02d:%02d' $(($1 / 3600)) $(($1 % 3600 / 60)) $(($1 % 60)); }
# "[k/N]" for the run that just ended, with this pass's rate and the time the others should take.
progress() {
  local k elapsed
  k=$( (flock -x 9; echo x >> "$finished"; wc -l < "$finished") 9> "$finished.lock")
  elapsed=$((SECONDS - pass_start))
  printf '[%d/%d, %s, %.1f runs/h, about %s left]' "$k" "$todo" "$(hms $elapsed)" \
    "$(awk -v k="$k" -v t="$elapsed" 'BEGIN { print (t > 0 ? 3600 * k / t : 0) }')" \
    "$(hms $((elapsed * (todo - k) / k)))"
}
queue() {  # like run, at most jobs_max at once; a failure is noted (and counted) and the others go on
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n || true; done
  { run "$@" || { echo "$*" >> "$failed"; echo "$(progress) $* failed"; }; } &
}
# The runs this pass has to do: those without a result file, of methods this build has.
todo=0 done_before=0
for task in $tasks; do
  for setting in $settings; do
    for seed in $seeds; do
      for row in $methods; do
        row_spec "$row"
        if [ -f "$results/$task-$setting-$row-s$seed.json" ]; then
          done_before=$((done_before + 1))
        elif grep -qxF -- "$method" <<< "$known_methods"; then
          todo=$((todo + 1))
        fi
      done
    done
  done
done
echo "$todo runs to do, $done_before done before (skipped), $jobs_max at a time"
pass_start=$SECONDS
# Seeds outermost within a task, so that a stopped benchmark leaves whole seeds of every method.
for task in $tasks; do
  task_last "$task" > /dev/null
  for setting in $settings; do
    for seed in $seeds; do
      for row in $methods; do queue "$task" "$setting" "$row" "$seed"; done
    done
  done
done
wait
python=${PYTHON:-python3}
images=docs/images
readme=(--readme README.md)
[ "$dir" = bench ] || { images=$dir/images; readme=(); }
plots=()
"$python" -c 'import matplotlib' 2> /dev/null ||
  { plots=(--no-plots); echo "no plots: $python has no matplotlib (pip install matplotlib, or set PYTHON)"; }
"$python" tools/bench_report.py --results "$results" --out "$dir/report.md" --images "$images" "${plots[@]}" \
  "${readme[@]}" > /dev/null
if [ ${#readme[@]} -gt 0 ]; then echo "$dir/report.md and the result tables of README.md written"; else echo "$dir/report.md written"; fi
echo "$(find "$results" -name '*.json' | wc -l) result files in $results; $(wc -l < "$failed") runs failed in this pass"
# The summary: all mIoU at the last step of every task, mean ± sd over the seeds (the report's first table).
awk '/^## All mIoU at the last step/ { on = 1; next } on && /^## / { exit } on && NF' "$dir/report.md"
[ ! -s "$failed" ]
