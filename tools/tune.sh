#!/usr/bin/env bash
# Tuning runs for hrhf-distill, scored on a held-out Shapes set generated from another seed
# (data/shapes-tune), never on the benchmark's validation labels.
#   [TASK=15-1] bash tools/tune.sh NAME ITERATIONS METHOD [extra hrhf-distill options...]
# TASK 15-5 (default) runs step 1; 15-1 runs steps 1-5 with the benchmark's per-step pack
# settings (16 images, 150 synthesis iterations), ITERATIONS per step.
# Prints one line: NAME old new all (tune set, 200 images, last step).
# BIN names another build's binaries (default .build/release), e.g. one built beside a running benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN:-.build/release}
name=$1 its=$2 method=$3; shift 3
task=${TASK:-15-5}
case $task in 15-5) last=1 ;; 15-1) last=5 ;; *) echo "TASK must be 15-5 or 15-1" >&2; exit 2 ;; esac
mkdir -p out/tune
[ -f data/shapes-tune/shapes.json ] || "$bin/hrhf-data" shapes --out data/shapes-tune --train 1 --val 200 --size 128 --seed 7 >/dev/null
[ -f out/tune/pack-15.tar ] || "$bin/hrhf-synth" --model zoo/shapes-15-5-step0.safetensors --classes 1-15 --count 64 --seed 0 --out out/tune/pack-15.tar >/dev/null
packs=()
case $method in hrhf*|gsc) packs=(--pack out/tune/pack-15.tar) ;; esac
if [ ! -f "out/tune/$name.safetensors" ]; then
  "$bin/hrhf-distill" --old zoo/shapes-15-5-step0.safetensors "${packs[@]}" --data data/shapes --dataset shapes \
    --task "$task" --step 1 --last-step "$last" --method "$method" --iterations "$its" --eval-limit 1 \
    --synth-count 16 --synth-iterations 150 --out "out/tune/$name.safetensors" "$@" > "out/tune/$name.log" 2>&1
fi
"$bin/hrhf-eval" --model "out/tune/$name.safetensors" --data data/shapes-tune --task "$task" --step "$last" \
  --json "out/tune/$name.json" >/dev/null 2>&1
python3 -c 'import json,sys; r=json.load(open(sys.argv[2])); print("%-40s old %5.1f new %5.1f all %5.1f" % (sys.argv[1], 100*r["old"], 100*r["new"], 100*r["all"]))' "$name" "out/tune/$name.json"
