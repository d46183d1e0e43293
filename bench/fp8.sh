#!/usr/bin/env bash
# FP8 against bf16 (issue 13, target: `compare --no-lora` of an FP8 pair <= 1.5x that of
# the same pair in bf16), all figures from one run: the pair PAIR (make_pair.py, bf16)
# and its FP8 copy (bench/fp8.py: DeepSeek-V3 / Qwen3-FP8 layout, F8_E4M3 weights with
# F32 128x128 tile scales), alternating `compare --no-lora` and the mapped pass
# (../shared/bench/mmappass.c) of each. Page cache warm before each timed command.
#
# usage: bench/fp8.sh [REPS] [PAIR]     (default 3 reps; PAIR default: the qwen3-0.6b
#        pair of make_pair.py, made in $WORK/pair)
set -euo pipefail
REPS=${1:-3}
WORK=${WORK:-/tmp/wd-bench-fp8}
. "$(dirname "$0")/common.sh"
PAIR=${2:-$WORK/pair}
[ -n "${2:-}" ] || make_pair "$PAIR"
FP8=$WORK/fp8-$(basename "$PAIR")
for side in base ft; do
  [ -f "$FP8/$side/config.json" ] || "$PY" "$HERE/bench/fp8.py" "$PAIR/$side" "$FP8/$side"
done
MMAPPASS=$WORK/mmappass
[ -x "$MMAPPASS" ] || gcc -O3 -pthread "$SHARED/mmappass.c" -o "$MMAPPASS"
RESULTS=$WORK/fp8_results.txt
: > "$RESULTS"
for i in $(seq "$REPS"); do
  echo "rep $i/$REPS ($(uptime | sed 's/.*load/load/'))" >&2
  for kind in bf16 fp8; do
    dir=$PAIR; [ "$kind" = fp8 ] && dir=$FP8
    files=$(ls "$dir"/base/*.safetensors "$dir"/ft/*.safetensors)
    cat $files > /dev/null; timed "$RESULTS" "${kind}_mmappass" "$MMAPPASS" $files
    cat $files > /dev/null; timed "$RESULTS" "${kind}_no_lora" "$WD" compare "$dir/base" "$dir/ft" -o "$WORK/out-$kind" --quiet --no-lora
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
print("| command | runs | median wall (s) | ratio to bf16 --no-lora | peak RSS (MiB) |")
print("| --- | --- | --- | --- | --- |")
for k in rows:
    print(f"| {k} | {len(rows[k])} | {med[k]:.2f} | {med[k] / med['bf16_no_lora']:.2f}x | {rss[k]:.0f} |")
PY
uptime
