#!/usr/bin/env bash
# The same three DeepLabV3-ResNet50 workloads at 256x256 in this toolkit and in PyTorch, both on
# the same thread count, each the median of several runs after warm-up, each in its own process
# (so peak memory is the workload's). Prints both times, the ratio, peak memory and this
# toolkit's convolution GFLOP/s against the sgemm rate measured in the same process; then the
# small zoo model's three jobs (synthesis, MiB and hrhf+gsc iterations) against
# tools/bench_small_torch.py, after parity checks of the logits and of each job's first loss.
# This machine's speed drifts by a third over minutes (other tenants), so the three programs
# run in turn for ROUNDS rounds and each figure is the median over the rounds: a slow minute
# then lands on all three, not on one.
#   bash tools/bench-vs-torch.sh [PYTHON_WITH_TORCH] [THREADS] [ROUNDS] [all|resnet50|small]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-/opt/torchvenv/bin/python}
threads=${2:-2}
rounds=${3:-3}
part=${4:-all}
case $part in all | resnet50 | small) ;; *) echo "bench-vs-torch.sh: the fourth argument is all, resnet50 or small" >&2; exit 1;; esac
swift build -c release --product hrhf-bench >/dev/null
get() { echo "$1" | tr ' ' '\n' | grep "^$2=" | cut -d= -f2; }
median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
if [ "$part" != small ]; then
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
fi
[ "$part" != resnet50 ] || exit 0

# The small zoo model's three jobs (deeplabv3-small, 128 px), one iteration each, in turn in every
# round: hrhf-bench --job against tools/bench_small_torch.py, which first recomputes the toolkit's
# first loss from the inputs hrhf-bench dumps and fails beyond 1e-5 relative.
bin=.build/release
for product in hrhf-synth hrhf-data hrhf-predict; do swift build -c release --product "$product" >/dev/null; done
[ -f data/shapes/shapes.json ] || "$bin/hrhf-data" shapes --out data/shapes --train 4000 --val 500 --size 128 --seed 0 >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
model=zoo/shapes-15-5-step0.safetensors
"$bin/hrhf-synth" --model "$model" --classes 1-15 --count 8 --synth-iterations 40 --seed 0 --threads "$threads" \
  --out "$tmp/pack.tar" > "$tmp/synth.log" 2>&1
images=(data/shapes/JPEGImages/*.png)
image=${images[0]}
"$bin/hrhf-predict" --model "$model" "$image" --out "$tmp/predict" --logits "$tmp/logits.npy" --threads "$threads" \
  >/dev/null
jobs="synth mib hrhf+gsc"
for j in $jobs; do
  "$bin/hrhf-bench" --job "$j" --model "$model" --data data/shapes --pack "$tmp/pack.tar" --dump "$tmp/$j" --repeats 1 \
    --threads "$threads" >/dev/null
done
"$python" tools/bench_small_torch.py --job synth --inputs "$tmp/synth" --model "$model" --threads "$threads" \
  --repeats 1 --logits-check "$image" "$tmp/logits.npy" >/dev/null
declare -A hs ts ratio spread
cost=""
for r in $(seq "$rounds"); do
  for j in $jobs; do
    ours=$("$bin/hrhf-bench" --job "$j" --model "$model" --data data/shapes --pack "$tmp/pack.tar" \
      --threads "$threads" --repeats 5)
    theirs=$("$python" tools/bench_small_torch.py --job "$j" --inputs "$tmp/$j" --model "$model" \
      --threads "$threads" --repeats 5)
    hs[$j]+=" $(get "$ours" it_per_s)"; ts[$j]+=" $(get "$theirs" it_per_s)"
    ratio[$j]+=" $(echo "$(get "$ours" it_per_s) / $(get "$theirs" it_per_s)" | bc -l)"
    [ "$j" = mib ] && mib_s=$(get "$ours" seconds)
    [ "$j" = hrhf+gsc ] && cost+=" $(echo "$(get "$ours" seconds) / $mib_s" | bc -l)"
    echo "round $r $j: $ours | $theirs" >&2
  done
done
range() { tr ' ' '\n' | grep . | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.2f-%.2f", lo, hi }'; }
printf "\n| zoo model job (deeplabv3-small, 128 px) | hrhf it/s | torch it/s | hrhf/torch | target "
printf "| hrhf it/s range | torch it/s range |\n"
printf "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
for j in $jobs; do
  case $j in synth) name="synthesis (SegInversion, batch 8)";; mib) name="MiB distillation (16 images)";;
    *) name="hrhf+gsc distillation (8 real + 8 fake)";; esac
  printf "| %s | %.3f | %.3f | %.2fx | >= 1.5x | %s | %s |\n" "$name" "$(echo ${hs[$j]} | median)" \
    "$(echo ${ts[$j]} | median)" "$(echo ${ratio[$j]} | median)" "$(echo ${hs[$j]} | range)" \
    "$(echo ${ts[$j]} | range)"
done
printf "\nhrhf+gsc iteration / MiB iteration (hrhf): %.2fx (target <= 1.3x)\n" "$(echo $cost | median)"
printf "(median over %s rounds of 5 iterations after one warm-up; each ratio the median of the rounds' ratios)\n" \
  "$rounds"
