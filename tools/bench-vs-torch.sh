#!/usr/bin/env bash
# The same three DeepLabV3-ResNet50 workloads at 256x256 in this toolkit and in PyTorch, both on
# the same thread count, each the median of several runs after warm-up, each in its own process
# (so peak memory is the workload's). Prints both times, the ratio, peak memory and this
# toolkit's convolution GFLOP/s against the sgemm rate measured in the same process; then the
# small zoo model's synthesis and distillation iterations per second.
# This machine's speed drifts by a third over minutes (other tenants), so the three programs
# run in turn for ROUNDS rounds and each figure is the median over the rounds: a slow minute
# then lands on all three, not on one.
#   bash tools/bench-vs-torch.sh [PYTHON_WITH_TORCH] [THREADS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-/opt/torchvenv/bin/python}
threads=${2:-2}
rounds=${3:-3}
swift build -c release --product hrhf-bench >/dev/null
get() { echo "$1" | tr ' ' '\n' | grep "^$2=" | cut -d= -f2; }
median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
printf "| workload | hrhf s | torch s | torch channels-last s | ratio hrhf/torch | hrhf peak MB | torch peak MB | hrhf conv GFLOP/s | of sgemm |\n"
printf "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
for w in eval train invert; do
  hs=""; ts=""; tcs=""; ratio=""; hp=""; tp=""; gf=""; share=""
  for _ in $(seq "$rounds"); do
    ours=$(.build/release/hrhf-bench --network deeplabv3-resnet50 --workload "$w" --threads "$threads" --repeats 3)
    theirs=$("$python" tools/bench_torch.py --workload "$w" --threads "$threads")
    theirs_cl=$("$python" tools/bench_torch.py --workload "$w" --threads "$threads" --channels-last)
    hs+=" $(get "$ours" seconds)"; ts+=" $(get "$theirs" seconds)"; tcs+=" $(get "$theirs_cl" seconds)"
    ratio+=" $(echo "$(get "$ours" seconds) / $(get "$theirs" seconds)" | bc -l)"
    hp+=" $(get "$ours" peak_mb)"; tp+=" $(get "$theirs" peak_mb)"; gf+=" $(get "$ours" gflops)"
    share+=" $(echo "100 * $(get "$ours" gflops) / $(get "$ours" sgemm)" | bc -l)"
  done
  printf "| %s (batch %s) | %.4f | %.4f | %.4f | %.2f | %.0f | %.0f | %.1f | %.0f%% |\n" "$w" "$(get "$ours" batch)" \
    "$(echo $hs | median)" "$(echo $ts | median)" "$(echo $tcs | median)" "$(echo $ratio | median)" \
    "$(echo $hp | median)" "$(echo $tp | median)" "$(echo $gf | median)" "$(echo $share | median)"
done
printf "\n(median over %s rounds; the ratio is the median of each round's ratio)\n" "$rounds"

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
