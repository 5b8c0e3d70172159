#!/usr/bin/env bash
# The same three DeepLabV3-ResNet50 workloads at 256x256 in this toolkit and in PyTorch, both on
# the same thread count, each the median of several runs after warm-up, each in its own process
# (so peak memory is the workload's). Prints both times, the ratio, peak memory and this
# toolkit's convolution GFLOP/s against the sgemm rate measured in the same run; then the
# small zoo model's synthesis and distillation iterations per second.
#   bash tools/bench-vs-torch.sh [PYTHON_WITH_TORCH] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-/opt/torchvenv/bin/python}
threads=${2:-2}
swift build -c release --product hrhf-bench >/dev/null
printf "| workload | hrhf s | torch s | torch channels-last s | ratio hrhf/torch | hrhf peak MB | torch peak MB | hrhf conv GFLOP/s | of sgemm |\n"
printf "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
for w in eval train invert; do
  ours=$(.build/release/hrhf-bench --network deeplabv3-resnet50 --workload "$w" --threads "$threads" --repeats 3)
  theirs=$("$python" tools/bench_torch.py --workload "$w" --threads "$threads")
  theirs_cl=$("$python" tools/bench_torch.py --workload "$w" --threads "$threads" --channels-last)
  get() { echo "$1" | tr ' ' '\n' | grep "^$2=" | cut -d= -f2; }
  hs=$(get "$ours" seconds); ts=$(get "$theirs" seconds); tcs=$(get "$theirs_cl" seconds)
  gf=$(get "$ours" gflops); sg=$(get "$ours" sgemm)
  printf "| %s (batch %s) | %s | %s | %s | %.2f | %s | %s | %s | %.0f%% |\n" "$w" "$(get "$ours" batch)" "$hs" "$ts" "$tcs" \
    "$(echo "$hs / $ts" | bc -l)" "$(get "$ours" peak_mb)" "$(get "$theirs" peak_mb)" "$gf" "$(echo "100 * $gf / $sg" | bc -l)"
done

# The small zoo model's two training loops (no PyTorch counterpart): SegInversion iterations
# (batch 8, 128 px) and hrhf+gsc distillation iterations (8 real + 8 fake, 128 px), each the
# average rate over its run as the progress line reports it.
bin=.build/release
swift build -c release --product hrhf-synth >/dev/null
swift build -c release --product hrhf-distill >/dev/null
[ -f data/shapes/shapes.json ] || "$bin/hrhf-data" shapes --out data/shapes --train 4000 --val 500 --size 128 --seed 0 >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rate() { grep -o '[0-9.]* it/s' "$1" | tail -n 1 | cut -d' ' -f1; }
"$bin/hrhf-synth" --model zoo/shapes-15-5-step0.safetensors --classes 1-15 --count 8 --synth-iterations 40 --seed 0 \
  --threads "$threads" --out "$tmp/pack.tar" > "$tmp/synth.log" 2>&1
"$bin/hrhf-distill" --old zoo/shapes-15-5-step0.safetensors --pack "$tmp/pack.tar" --data data/shapes --task 15-5 --step 1 \
  --method hrhf+gsc --iterations 40 --eval-limit 1 --threads "$threads" --out "$tmp/step1.safetensors" > "$tmp/distill.log" 2>&1
printf "\n| zoo model (deeplabv3-small, 128 px) | iterations/s |\n| --- | ---: |\n"
printf "| hrhf-synth (batch 8) | %s |\n| hrhf-distill hrhf+gsc (8 real + 8 fake) | %s |\n" "$(rate "$tmp/synth.log")" "$(rate "$tmp/distill.log")"
