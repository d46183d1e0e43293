#!/usr/bin/env bash
# The low-rank stage's cost (issue 11, target 2), all figures from one run: for each pair,
# alternating, the mapped pass (../shared/bench/mmappass.c, the physical limit of
# reading), `compare --no-lora` (the diff) and the default `compare` (diff + low-rank
# analysis + rank-16 extraction). Page cache warm before each timed command. Prints the
# medians, the ratio compare / compare --no-lora (target <= 3x) and the load.
#
# usage: [WD_BASE=/path/to/old/weightdiff] bench/lowrank.sh [REPS] [PAIR_DIR...]
#   WD_BASE: an older build timed in the same alternation (rows <pair>_base_no_lora,
#   <pair>_base_compare), for before/after ratios measured in one run
#   (default 3 reps; pairs from make_pair.py, e.g. /work/data/p06 = --preset qwen3-0.6b
#    --targets all-linear --dense-noise 0.01, /work/data/p32 = --preset qwen3-32b
#    --layers 4 --targets none --dense-noise 0.01 --dense-noise-targets '.*')
set -euo pipefail
REPS=${1:-3}; shift || true
WORK=${WORK:-/tmp/wd-bench-lowrank}
. "$(dirname "$0")/common.sh"
MMAPPASS=$WORK/mmappass
[ -x "$MMAPPASS" ] || gcc -O3 -pthread "$SHARED/mmappass.c" -o "$MMAPPASS"
RESULTS=$WORK/lowrank_results.txt
: > "$RESULTS"
for i in $(seq "$REPS"); do
  for pair in "$@"; do
    tag=$(basename "$pair")
    files=$(ls "$pair"/base/*.safetensors "$pair"/ft/*.safetensors)
    warm() { cat $files > /dev/null; }
    echo "rep $i/$REPS $tag ($(uptime | sed 's/.*load/load/'))" >&2
    warm; timed "$RESULTS" "${tag}_mmappass" "$MMAPPASS" $files
    warm; timed "$RESULTS" "${tag}_no_lora" "$WD" compare "$pair/base" "$pair/ft" -o "$WORK/out-$tag-nl" --quiet --no-lora
    warm; timed "$RESULTS" "${tag}_compare" "$WD" compare "$pair/base" "$pair/ft" -o "$WORK/out-$tag" --quiet
    if [ -n "${WD_BASE:-}" ]; then
      warm; timed "$RESULTS" "${tag}_base_no_lora" "$WD_BASE" compare "$pair/base" "$pair/ft" -o "$WORK/out-$tag-bnl" --quiet --no-lora
      warm; timed "$RESULTS" "${tag}_base_compare" "$WD_BASE" compare "$pair/base" "$pair/ft" -o "$WORK/out-$tag-b" --quiet
    fi
  done
done
python3 - "$RESULTS" <<'PY'
import statistics, sys, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, ns, kb = line.split()
    rows[name].append((int(ns) / 1e9, int(kb)))
med = {k: statistics.median(s for s, _ in v) for k, v in rows.items()}
rss = {k: max(kb for _, kb in v) / 1024 for k, v in rows.items()}
print("| command | runs | median wall (s) | ratio to --no-lora | ratio to mapped pass | peak RSS (MiB) |")
print("| --- | --- | --- | --- | --- | --- |")
for k in rows:
    tag = k.rsplit("_", 1)[0] if not k.endswith("no_lora") else k[: -len("_no_lora")]
    tag = k.split("_")[0]
    nl, mp = med[f"{tag}_no_lora"], med[f"{tag}_mmappass"]
    print(f"| {k} | {len(rows[k])} | {med[k]:.2f} | {med[k] / nl:.2f}x | {med[k] / mp:.2f}x | {rss[k]:.0f} |")
PY
uptime
