#!/usr/bin/env bash
# The main job on the embedded default, end to end: the zoo's Shapes model (classes 0-15)
# is inverted into a synthetic pack of its 15 old classes, then learns classes 16-20 from
# real images of them plus the pack (half-real half-fake distillation with GSC), and is
# evaluated on old and new classes. About 5 minutes on 2 cores once built (10 from a fresh clone).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
swift build -c release
bin=.build/release
mkdir -p out
if [ ! -f data/shapes/shapes.json ]; then
  "$bin/hrhf-data" shapes --out data/shapes --train 4000 --val 500 --size 128 --seed 0
fi
model=zoo/shapes-15-5-step0.safetensors
"$bin/hrhf-synth" --model "$model" --classes 1-15 --count 32 --synth-iterations 150 --seed 0 --out out/pack.tar
"$bin/hrhf-pack" verify out/pack.tar --model "$model"
"$bin/hrhf-pack" sheet out/pack.tar --out out/pack-sheet.png
# The pack was just made anew: a step-1 model or checkpoint left by an earlier run (other code,
# so perhaps another pack) would be kept by hrhf-distill's resume, so the step starts afresh.
rm -rf out/step1.safetensors out/step1.safetensors.* out/step1-eval.json
"$bin/hrhf-distill" --old "$model" --pack out/pack.tar --data data/shapes --dataset shapes --task 15-5 --step 1 \
  --method hrhf+gsc --iterations 400 --eval-limit 200 --out out/step1.safetensors
"$bin/hrhf-eval" --model out/step1.safetensors --data data/shapes --dataset shapes --task 15-5 --step 1 --json out/step1-eval.json
echo
echo "contact sheet of the synthetic pack: out/pack-sheet.png"
echo "new model: out/step1.safetensors (evaluation: out/step1-eval.json)"
