#!/usr/bin/env bash
# Benchmark of LoRA extraction (issue 3), all figures from one run, on the qwen3-0.6b pair
# of ../shared/bench/make_pair.py (rank-16 LoRA merged into q/k/v/o, bf16):
#   - weightdiff extract-lora --rank 16 and --rank 64 (REPS runs each, medians);
#   - mergekit-extract-lora --max-rank 16 and 64 (one run each: ~100 s apiece);
#   - reconstruction error of every adapter against the true delta (eval_lora.py --oracle);
#   - weightdiff compare (diff + analysis + extraction) vs compare --no-lora (the plain diff);
#   - peak RSS of each (/usr/bin/time).
# Page cache warm before each timed command.
#
# usage: bench/extract_lora.sh [REPS] [WORKDIR]      (default 3, /tmp/wd-bench)
set -euo pipefail
REPS=${1:-3}
WORK=${2:-/tmp/wd-bench}
. "$(dirname "$0")/common.sh"
MK=$(dirname "$PY")/mergekit-extract-lora
PAIR=$WORK/pair
make_pair "$PAIR"

warm() { cat "$PAIR"/base/*.safetensors "$PAIR"/ft/*.safetensors > /dev/null; }
RESULTS=$WORK/lora_results.txt
: > "$RESULTS"
run() { # NAME CMD...: warms the pair, then one timed run into results
  local name=$1; shift
  warm
  timed "$RESULTS" "$name" "$@"
}
evaluate() { # NAME ADAPTER_DIR
  "$PY" "$SHARED/eval_lora.py" "$PAIR" "$2" --oracle --json "$WORK/eval_$1.json" > /dev/null 2>&1
  echo "$1 $(python3 -c "import json,sys; d=json.load(open('$WORK/eval_$1.json'))['summary']; print(d['mean_rel_err_vs_true'], d.get('mean_oracle_err_true_r%d' % d['adapter_r'], 'nan'), d['adapter_r'])")" >> "$WORK/lora_errors.txt"
}
: > "$WORK/lora_errors.txt"
for i in $(seq "$REPS"); do
  echo "rep $i/$REPS" >&2
  for r in 16 64; do
    rm -rf "$WORK/wd$r"
    run "weightdiff_r$r" "$WD" extract-lora "$PAIR/base" "$PAIR/ft" -o "$WORK/wd$r" --rank "$r" --quiet
  done
  run compare_no_lora "$WD" compare "$PAIR/base" "$PAIR/ft" -o "$WORK/cmp-nolora" --quiet --no-lora
  run compare_full "$WD" compare "$PAIR/base" "$PAIR/ft" -o "$WORK/cmp-full" --quiet
done
for r in 16 64; do
  evaluate "weightdiff_r$r" "$WORK/wd$r"
  rm -rf "$WORK/mk$r"
  run "mergekit_r$r" "$MK" --model "$PAIR/ft" --base-model "$PAIR/base" --out-path "$WORK/mk$r" --max-rank "$r"
  evaluate "mergekit_r$r" "$WORK/mk$r"
done
du -sb "$WORK"/wd16/adapter_model.safetensors "$WORK"/mk16/adapter_model.safetensors > "$WORK/lora_sizes.txt"

python3 - "$RESULTS" "$WORK/lora_errors.txt" "$WORK/lora_sizes.txt" <<'PY'
import statistics, sys, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, ns, kb = line.split()
    rows[name].append((int(ns) / 1e9, int(kb)))
med = {k: statistics.median(s for s, _ in v) for k, v in rows.items()}
rss = {k: max(kb for _, kb in v) / 1024 for k, v in rows.items()}
err = {}
for line in open(sys.argv[2]):
    name, e, oracle, r = line.split()
    err[name] = (float(e), float(oracle))
sizes = {line.split()[1].split("/")[-2]: int(line.split()[0]) for line in open(sys.argv[3])}
print("| command | runs | median wall (s) | peak RSS (MiB) | mean rel. error vs true delta | oracle rank-r error |")
print("| --- | --- | --- | --- | --- | --- |")
for k in ["weightdiff_r16", "mergekit_r16", "weightdiff_r64", "mergekit_r64", "compare_no_lora", "compare_full"]:
    if k in med:
        e = err.get(k, (float("nan"), float("nan")))
        print(f"| {k} | {len(rows[k])} | {med[k]:.2f} | {rss[k]:.0f} | {e[0]:.5f} | {e[1]:.5f} |")
print()
for r in (16, 64):
    w, m = f"weightdiff_r{r}", f"mergekit_r{r}"
    print(f"rank {r}: weightdiff {med[m] / med[w]:.1f}x faster (target >= 20x, issue 11), peak RSS {rss[w] / rss[m]:.3f} of mergekit's "
          f"(target <= 0.25), error {err[w][0]:.5f} vs mergekit {err[m][0]:.5f} (target <=)")
print(f"full compare (diff + analysis + rank-16 extraction) / plain diff: {med['compare_full'] / med['compare_no_lora']:.1f}x")
print(f"adapter size at rank 16: weightdiff {sizes.get('wd16', 0) / 1e6:.1f} MB, mergekit {sizes.get('mk16', 0) / 1e6:.1f} MB")
PY
