#!/usr/bin/env bash
# Submits a sharded weightdiff comparison: an array job of N shards, then a merge job
# that runs only if every shard succeeded (--dependency=afterok).
#   usage: submit.sh BASE FT OUT N [extra sbatch args...]
# Prints the merge job's id. The merged outputs land in OUT/merged.
set -euo pipefail
BASE=$1 FT=$2 OUT=$3 N=$4
shift 4
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT/parts"
export BASE FT OUT WEIGHTDIFF=${WEIGHTDIFF:-weightdiff}
array=$(sbatch --parsable --chdir="$OUT" --export=ALL --array=0-$((N - 1)) "$@" "$here/compare.sbatch")
sbatch --parsable --chdir="$OUT" --export=ALL --dependency=afterok:"${array%%;*}" "$@" "$here/merge.sbatch"
