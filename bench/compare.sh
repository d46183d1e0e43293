#!/usr/bin/env bash
# End-to-end benchmark of the comparison engine (issue 2), all figures from one run:
#   - a plain pass over the same files (cat > /dev/null): the physical limit here;
#   - weightdiff compare --no-lora (the diff, all cores, bytes in place), with --verify,
#     and with --read-mode pread (positioned reads instead, RELIABILITY.md);
#   - the Python baseline ../shared/bench/seed_compare.py, --no-numpy and default;
#   - peak RSS (/usr/bin/time) on the pair and on a pair twice as large.
# Page cache warm: every timed command is preceded by a cat of the pair's files.
# Prints a Markdown table (medians) and the ratios the issue's targets are stated in.
#
# usage: [PAIRS="DIR..." [WD_BASE=...]] bench/compare.sh [REPS] [WORKDIR]      (default 5 reps, /tmp/wd-bench)
# Needs ../shared/bench (setup.sh makes the Python venv; the pairs are made once).
set -euo pipefail
REPS=${1:-5}
WORK=${2:-/tmp/wd-bench}
. "$(dirname "$0")/common.sh"

# The read path (issue 11, target 1): with PAIRS="DIR..." (pairs of make_pair.py), for
# each pair in alternation: the 2-thread mapped pass (../shared/bench/mmappass.c, the
# limit), `compare --no-lora` (default: in place), `--read-mode pread`, and, with
# WD_BASE=/path/to/older/weightdiff, that build's `--no-lora`. Warm cache; medians,
# ratios to the mapped pass, peak RSS, load average; then exits.
if [ -n "${PAIRS:-}" ]; then
  MMAPPASS=$WORK/mmappass
  [ -x "$MMAPPASS" ] || gcc -O3 -pthread "$SHARED/mmappass.c" -o "$MMAPPASS"
  RESULTS=$WORK/readpath_results.txt
  : > "$RESULTS"
  for i in $(seq "$REPS"); do
    for pair in $PAIRS; do
      tag=$(basename "$pair")
      files=$(ls "$pair"/base/*.safetensors "$pair"/ft/*.safetensors)
      echo "rep $i/$REPS $tag ($(uptime | sed 's/.*load/load/'))" >&2
      cat $files > /dev/null; timed "$RESULTS" "${tag}_mmappass" "$MMAPPASS" $files
      cat $files > /dev/null; timed "$RESULTS" "${tag}_mapped" "$WD" compare "$pair/base" "$pair/ft" -o "$WORK/out-$tag" --quiet --no-lora
      cat $files > /dev/null; timed "$RESULTS" "${tag}_pread" "$WD" compare "$pair/base" "$pair/ft" -o "$WORK/out-$tag-p" --quiet --no-lora --read-mode pread
      if [ -n "${WD_BASE:-}" ]; then
        cat $files > /dev/null; timed "$RESULTS" "${tag}_base" "$WD_BASE" compare "$pair/base" "$pair/ft" -o "$WORK/out-$tag-b" --quiet --no-lora
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
print("| command | runs | median wall (s) | ratio to mapped pass | peak RSS (MiB) |")
print("| --- | --- | --- | --- | --- |")
for k in rows:
    mp = med[k.rsplit("_", 1)[0] + "_mmappass"]
    print(f"| {k} | {len(rows[k])} | {med[k]:.3f} | {med[k] / mp:.2f}x | {rss[k]:.0f} |")
PY
  uptime
  exit 0
fi

make_pair "$WORK/pair"
make_pair "$WORK/pair2x" --layers 66

warm() { cat "$1"/base/*.safetensors "$1"/ft/*.safetensors > /dev/null; }

# run NAME PAIR CMD... : warms PAIR, then one timed run into results
RESULTS=$WORK/results.txt
: > "$RESULTS"
run() {
  local name=$1 pair=$2; shift 2
  warm "$pair"
  timed "$RESULTS" "$name" "$@"
}

for i in $(seq "$REPS"); do
  echo "rep $i/$REPS" >&2
  run plain_pass "$WORK/pair" sh -c "cat $WORK/pair/base/*.safetensors $WORK/pair/ft/*.safetensors > /dev/null"
  run weightdiff "$WORK/pair" "$WD" compare "$WORK/pair/base" "$WORK/pair/ft" -o "$WORK/out" --quiet --no-lora
  run weightdiff_verify "$WORK/pair" "$WD" compare "$WORK/pair/base" "$WORK/pair/ft" -o "$WORK/out-verify" --quiet --no-lora --verify
  run weightdiff_pread "$WORK/pair" "$WD" compare "$WORK/pair/base" "$WORK/pair/ft" -o "$WORK/out-pread" --quiet --no-lora --read-mode pread
  run weightdiff_2x "$WORK/pair2x" "$WD" compare "$WORK/pair2x/base" "$WORK/pair2x/ft" -o "$WORK/out2x" --quiet --no-lora
  run plain_pass_2x "$WORK/pair2x" sh -c "cat $WORK/pair2x/base/*.safetensors $WORK/pair2x/ft/*.safetensors > /dev/null"
done
# The Python baseline is slow: fewer repetitions.
for i in $(seq $(( (REPS + 1) / 2 ))); do
  run python_no_numpy "$WORK/pair" "$PY" "$SHARED/seed_compare.py" "$WORK/pair/base" "$WORK/pair/ft" --out-dir "$WORK/seed" --no-numpy
done
run python_numpy "$WORK/pair" "$PY" "$SHARED/seed_compare.py" "$WORK/pair/base" "$WORK/pair/ft" --out-dir "$WORK/seed"

python3 - "$RESULTS" <<'PY'
import statistics, sys, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, secs, kb = line.split()
    rows[name].append((int(secs) / 1e9, int(kb)))
med = {k: statistics.median(s for s, _ in v) for k, v in rows.items()}
rss = {k: max(kb for _, kb in v) / 1024 for k, v in rows.items()}
base = med["plain_pass"]
print(f"| command | runs | median wall (s) | ratio to plain pass | peak RSS (MiB) |")
print(f"| --- | --- | --- | --- | --- |")
for k in ["plain_pass", "weightdiff", "weightdiff_verify", "weightdiff_pread", "python_no_numpy", "python_numpy", "plain_pass_2x", "weightdiff_2x"]:
    if k in med:
        ref = med["plain_pass_2x"] if k.endswith("2x") else base
        print(f"| {k} | {len(rows[k])} | {med[k]:.3f} | {med[k] / ref:.2f}x | {rss[k]:.0f} |")
print()
print(f"weightdiff vs plain pass: {med['weightdiff'] / base:.2f}x (target <= 1.25x)")
print(f"python --no-numpy / weightdiff: {med['python_no_numpy'] / med['weightdiff']:.1f}x faster (target >= 20x)")
print(f"python (numpy) / weightdiff: {med['python_numpy'] / med['weightdiff']:.1f}x faster")
print(f"python (numpy) / weightdiff --verify: {med['python_numpy'] / med['weightdiff_verify']:.1f}x faster")
print(f"positioned reads (--read-mode pread) / in place (default): {med['weightdiff_pread'] / med['weightdiff']:.2f}x the time")
print(f"peak RSS weightdiff: {rss['weightdiff']:.0f} MiB; on the 2x pair: {rss['weightdiff_2x']:.0f} MiB "
      f"({100 * (rss['weightdiff_2x'] / rss['weightdiff'] - 1):+.1f} %) (target <= 300 MiB, +-10 %)")
PY
