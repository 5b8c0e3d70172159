#!/usr/bin/env bash
# Fuzzes one reader of untrusted files with libFuzzer and AddressSanitizer.
#
#   tools/fuzz.sh TARGET [SECONDS]   build hrhf-fuzz instrumented, fuzz TARGET (default 60 s)
#   tools/fuzz.sh --make-seeds       rewrite the committed seeds (Fixtures/fuzz-seeds)
#
# TARGET is one of FuzzTarget's cases (Sources/HRHF/Fuzz/FuzzTargets.swift): pickle pth
# safetensors pack png jpeg list npy. The build is a debug one with -O (Swift's checks on) in .build-fuzz,
# C targets instrumented too. The corpus grows in .build-fuzz/corpus/TARGET (outside git), seeded
# from the committed fixtures. libFuzzer runs in fork mode on one core, so a crash does not end
# the run; each distinct crash (by its first frame in Sources/) is copied, smallest input first,
# to Tests/HRHFTests/Fixtures/fuzz-regressions/TARGET/, which the test suite replays. Limits:
# 1 GB of memory (the issue's bound), 10 s per input. Extra arguments go to libFuzzer.
set -euo pipefail
cd "$(dirname "$0")/.."
targets="pickle pth safetensors pack png jpeg list npy"
fixtures=Tests/HRHFTests/Fixtures
scratch=.build-fuzz

if [[ "${1:-}" == "--make-seeds" ]]; then
    # Hand-made pickles, checkpoints, .npy and list files, then a tiny model and a pack made by
    # the tools themselves (ordinary debug build).
    python3 tools/gen_fuzz_seeds.py
    swift build --product hrhf-data && swift build --product hrhf-train && swift build --product hrhf-synth
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    bin=.build/debug
    printf '%s' '{"asppRates":[12,24,36],"auxHead":false,"baseWidth":1,"block":"basic","classesPerStep":[16],
"flavor":"torchvision","headChannels":2,"layers":[1,1,1,1],"name":"tiny","outputStride":8}' > "$work/tiny.json"
    $bin/hrhf-data shapes --out "$work/shapes" --train 8 --val 4 --size 32 --threads 1 > /dev/null
    $bin/hrhf-train --data "$work/shapes" --arch "$work/tiny.json" --iterations 1 --batch 2 --crop 32 \
        --eval-limit 2 --out "$fixtures/fuzz-seeds/safetensors/tiny_model.safetensors" --threads 1 > /dev/null
    mkdir -p "$fixtures/fuzz-seeds/pack"
    $bin/hrhf-synth --model "$fixtures/fuzz-seeds/safetensors/tiny_model.safetensors" --classes 1-5 --count 2 \
        --synth-iterations 2 --synth-batch 2 --resolution 16 --out "$fixtures/fuzz-seeds/pack/tiny_pack.tar" \
        --threads 1 > /dev/null
    echo "seeds written under $fixtures/fuzz-seeds"
    exit 0
fi

target=${1:-}
seconds=${2:-60}
if [[ " $targets " != *" $target "* ]]; then
    echo "usage: tools/fuzz.sh TARGET [SECONDS] [libFuzzer flags]   (TARGET: $targets)" >&2
    echo "       tools/fuzz.sh --make-seeds" >&2
    exit 2
fi
shift $(( $# >= 2 ? 2 : 1 ))

# ld.gold warns about every sanitizer symbol it cannot export: only the rest is shown.
# Debug configuration with -O: optimised, but never -Ounchecked, so Swift's checks stay on.
swift build --scratch-path "$scratch" --product hrhf-fuzz -Xswiftc -O \
    -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING -Xcc -fsanitize=fuzzer-no-link,address 2>&1 \
    | { grep -v "Cannot export local symbol" || true; }
binary=$scratch/debug/hrhf-fuzz

corpus=$scratch/corpus/$target
artifacts=$scratch/artifacts/$target
regressions=$fixtures/fuzz-regressions/$target
mkdir -p "$corpus" "$artifacts" "$regressions"
seeds=()
[[ -d "$fixtures/fuzz-seeds/$target" ]] && seeds+=("$fixtures/fuzz-seeds/$target")
case $target in
    pickle)
        for pth in "$fixtures"/models/*.pth; do
            unzip -p "$pth" '*/data.pkl' > "$corpus/$(basename "$pth" .pth).pkl" 2>/dev/null \
                || rm -f "$corpus/$(basename "$pth" .pth).pkl"
        done ;;
    pth) cp -n "$fixtures"/models/tv_small.pth "$fixtures"/models/tv_small_legacy.pth \
        "$fixtures"/models/hostile/* "$corpus"/ ;;
    safetensors) cp -n "$fixtures"/models/mib_small_logits.safetensors "$corpus"/ ;;
    png) cp -n "$fixtures"/images/*.png "$corpus"/ ;;
    jpeg) cp -n "$fixtures"/images/*.jpg "$corpus"/ ;;
esac

log=$scratch/fuzz-$target.log
marker=$scratch/fuzz-$target.started
touch "$marker"
started=$(date +%s)
# Swift's own crash backtracer would take over the signal libFuzzer needs to see.
SWIFT_BACKTRACE=enable=no HRHF_FUZZ_TARGET=$target ASAN_OPTIONS=detect_leaks=0 \
    "$binary" "$corpus" "${seeds[@]}" "$regressions" \
    -fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1 \
    -max_total_time="$seconds" -rss_limit_mb=1024 -malloc_limit_mb=1024 -timeout=10 -detect_leaks=0 \
    -artifact_prefix="$artifacts/" "$@" > "$log" 2>&1 || true
elapsed=$(( $(date +%s) - started ))
# An input that crashes or times out never removes its scratch folder: remove those of dead processes.
for dir in /dev/shm/hrhf-fuzz-*; do
    [[ -d "$dir" ]] || continue
    pid=${dir#/dev/shm/hrhf-fuzz-}
    kill -0 "${pid%%-*}" 2>/dev/null || rm -rf "$dir"
done

# One regression file per distinct crash: the first frame in Sources/ outside the harness, or
# for a harness violation its first two words.
new=0 distinct=0
signatures=" "
for file in $(find "$artifacts" -type f -newer "$marker" -printf '%s %f\n' | sort -n | cut -d' ' -f2); do
    report=$(SWIFT_BACKTRACE=enable=no HRHF_FUZZ_TARGET=$target ASAN_OPTIONS=detect_leaks=0 \
        "$binary" -rss_limit_mb=1024 -malloc_limit_mb=1024 -timeout=10 "$artifacts/$file" 2>&1 || true)
    if ! grep -qE "ERROR: (libFuzzer|AddressSanitizer)" <<< "$report"; then
        echo "not reproduced on replay: $artifacts/$file"
        continue
    fi
    violation=$(sed -nE 's/.*Fatal error: hrhf-fuzz: ([^ ]+ [^ ]+).*/\1/p' <<< "$report" | head -1)
    frame=$(grep -oE "Sources/[^ ]+\.(swift|c):[0-9]+" <<< "$report" | grep -v "/Fuzz\(Targets\|Entry\)" \
        | head -1 || true)
    signature="${file%%-*}:${violation:+violation:}${violation:-${frame:-no-frame-in-Sources}}"
    signature=${signature// /_}
    [[ "$signatures" == *" $signature "* ]] && continue
    signatures+="$signature "
    distinct=$((distinct + 1))
    if [[ ! -e "$regressions/$file" ]]; then
        cp "$artifacts/$file" "$regressions/$file"
        new=$((new + 1))
    fi
    echo "crash: $signature -> $regressions/$file"
done

status=$(grep -E "^#[0-9]+: cov:" "$log" | tail -1 || true)
executions=$(sed -nE 's/^#([0-9]+): .*/\1/p' <<< "$status")
cov=$(sed -nE 's/.* cov: ([0-9]+) .*/\1/p' <<< "$status")
ft=$(sed -nE 's/.* ft: ([0-9]+) .*/\1/p' <<< "$status")
events=$(sed -nE 's/.* oom\/timeout\/crash: ([0-9\/]+) .*/\1/p' <<< "$status")
rate=$(( ${executions:-0} / (elapsed > 0 ? elapsed : 1) ))
echo "fuzz $target: ${executions:-0} executions in ${elapsed} s ($rate exec/s)," \
    "cov ${cov:-?} ft ${ft:-?}, oom/timeout/crash events ${events:-0/0/0}, distinct crashes $distinct" \
    "($new new in $regressions); log $log"
