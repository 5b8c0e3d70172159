#!/usr/bin/env bash
# Submits the synthesis array of N tasks and the merge job that waits for all of them (afterok).
#   tools/cluster/submit-synth.sh 16     (variables such as TEACHER, COUNT, PACK pass through)
set -euo pipefail
parts=${1:?usage: submit-synth.sh N}
here=$(dirname "$0")
jid=$(sbatch --parsable --array=0-$((parts - 1)) "$here/synth-array.sbatch")
sbatch --dependency=afterok:"$jid" --export=ALL,PARTS="$parts" "$here/synth-merge.sbatch"
echo "synthesis array $jid, merge after it"
