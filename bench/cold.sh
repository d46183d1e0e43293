#!/usr/bin/env bash
# The comparison read from disk (issue 11, target 4): for each pair, alternating, with
# the page cache dropped before every command (root: /proc/sys/vm/drop_caches), the
# mapped pass (../shared/bench/mmappass.c), `compare --no-lora` and the default
# `compare`, and with WD_BASE an older build's `compare` in the same alternation. For a
# pair larger than memory (make_pair.py --preset qwen3-32b --layers 16: 2 x 19 GB) this is
# the job as users run it; for one that fits, the later passes of the low-rank stage
# find the cache warm. Prints the medians, ratios to --no-lora and the mapped pass, and
# peak RSS.
#
# usage: [WD_BASE=/path/to/old/weightdiff] bench/cold.sh [REPS] PAIR_DIR...
set -euo pipefail
REPS=${1:-1}; shift || true
WORK=${WORK:-/tmp/wd-bench-cold}
NO_PEERS=1
. "$(dirname "$0")/common.sh"
MMAPPASS=$WORK/mmappass
[ -x "$MMAPPASS" ] || gcc -O3 -pthread "$SHARED/mmappass.c" -o "$MMAPPASS"
RESULTS=$WORK/cold_results.txt
: > "$RESULTS"
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
for i in $(seq "$REPS"); do
  for pair in "$@"; do
    tag=$(basename "$pair")
    files=$(ls "$pair"/base/*.safetensors "$pair"/ft/*.safetensors)
    echo "rep $i/$REPS $tag ($(uptime | sed 's/.*load/load/'))" >&2
    cold; timed "$RESULTS" "${tag}_mmappass" "$MMAPPASS" $files
    cold; timed "$RESULTS" "${tag}_no_lora" "$WD" compare "$pair/base" "$pair/ft" -o "$WORK/out-$tag-nl" --quiet --no-lora
    cold; timed "$RESULTS" "${tag}_compare" "$WD" compare "$pair/base" "$pair/ft" -o "$WORK/out-$tag" --quiet
    if [ -n "${WD_BASE:-}" ]; then
      cold; timed "$RESULTS" "${tag}_base_compare" "$WD_BASE" compare "$pair/base" "$pair/ft" -o "$WORK/out-$tag-b" --quiet
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
print("| command (cold) | runs | median wall (s) | ratio to --no-lora | ratio to mapped pass | peak RSS (MiB) |")
print("| --- | --- | --- | --- | --- | --- |")
for k, v in rows.items():
    tag = k.split("_")[0]
    nl, mp = med[f"{tag}_no_lora"], med[f"{tag}_mmappass"]
    rss = max(kb for _, kb in v) / 1024
    print(f"| {k} | {len(v)} | {med[k]:.2f} | {med[k] / nl:.2f}x | {med[k] / mp:.2f}x | {rss:.0f} |")
PY
uptime
