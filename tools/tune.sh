#!/usr/bin/env bash
# Tuning runs for hrhf-distill, scored on a held-out Shapes set generated from another seed
# (data/shapes-tune), never on the benchmark's validation labels.
#   bash tools/tune.sh NAME ITERATIONS METHOD [extra hrhf-distill options...]
# Prints one line: NAME old new all (tune set, 200 images).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.build/release
name=$1 its=$2 method=$3; shift 3
mkdir -p out/tune
[ -f data/shapes-tune/shapes.json ] || "$bin/hrhf-data" shapes --out data/shapes-tune --train 1 --val 200 --size 128 --seed 7 >/dev/null
[ -f out/tune/pack-15.tar ] || "$bin/hrhf-synth" --model zoo/shapes-15-5-step0.safetensors --classes 1-15 --count 64 --seed 0 --out out/tune/pack-15.tar >/dev/null
packs=()
case $method in hrhf|hrhf+gsc|gsc) packs=(--pack out/tune/pack-15.tar) ;; esac
if [ ! -f "out/tune/$name.safetensors" ]; then
  "$bin/hrhf-distill" --old zoo/shapes-15-5-step0.safetensors "${packs[@]}" --data data/shapes --dataset shapes \
    --task 15-5 --step 1 --method "$method" --iterations "$its" --eval-limit 1 --out "out/tune/$name.safetensors" "$@" \
    > "out/tune/$name.log" 2>&1
fi
"$bin/hrhf-eval" --model "out/tune/$name.safetensors" --data data/shapes-tune --task 15-5 --json "out/tune/$name.json" >/dev/null 2>&1
python3 -c 'import json,sys; r=json.load(open(sys.argv[2])); print("%-40s old %5.1f new %5.1f all %5.1f" % (sys.argv[1], 100*r["old"], 100*r["new"], 100*r["all"]))' "$name" "out/tune/$name.json"
