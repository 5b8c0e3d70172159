#!/usr/bin/env bash
# The same three DeepLabV3-ResNet50 workloads at 256x256 in this toolkit and in PyTorch, both on
# the same thread count, each the median of several runs after warm-up, each in its own process
# (so peak memory is the workload's). Prints both times, the ratio, peak memory and this
# toolkit's convolution GFLOP/s against the sgemm rate measured in the same run.
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
