#!/usr/bin/env bash
# PyTorch checkpoints: the qwen3-0.6b pair of bench/compare.sh written by torch.save as
# pytorch_model.bin (zip format, and the pre-1.6 legacy format), all figures from one run:
#   - a plain pass over the .bin files (cat > /dev/null);
#   - weightdiff compare --no-lora on the safetensors pair, on the zip .bin pair and on
#     the legacy .bin pair;
#   - the Python route for .bin: torch.load(weights_only=True, mmap=True) + per-tensor
#     metrics in torch (bench/torch_bin.py compare);
#   - peak RSS of each (/usr/bin/time).
# Page cache warm: every timed command is preceded by a cat of its files.
#
# usage: bench/torch_bin.sh [REPS] [WORKDIR]      (default 3 reps, /tmp/wd-bench)
set -euo pipefail
REPS=${1:-3}
WORK=${2:-/tmp/wd-bench}
. "$(dirname "$0")/common.sh"
make_pair "$WORK/pair"
for side in base ft; do
  [ -f "$WORK/bin/$side/pytorch_model.bin" ] || "$PY" "$HERE/bench/torch_bin.py" convert "$WORK/pair/$side" "$WORK/bin/$side"
  [ -f "$WORK/bin-legacy/$side/pytorch_model.bin" ] || "$PY" "$HERE/bench/torch_bin.py" convert "$WORK/pair/$side" "$WORK/bin-legacy/$side" --legacy
done

RESULTS=$WORK/results-bin.txt
: > "$RESULTS"
run() { # NAME FILES CMD...: warms FILES, then one timed run into results
  local name=$1 files=$2; shift 2
  cat $files > /dev/null
  timed "$RESULTS" "$name" "$@"
}
BIN="$WORK/bin/base/pytorch_model.bin $WORK/bin/ft/pytorch_model.bin"
LEG="$WORK/bin-legacy/base/pytorch_model.bin $WORK/bin-legacy/ft/pytorch_model.bin"
ST="$WORK/pair/base/*.safetensors $WORK/pair/ft/*.safetensors"
for i in $(seq "$REPS"); do
  echo "rep $i/$REPS" >&2
  run plain_pass_bin "$BIN" sh -c "cat $BIN > /dev/null"
  run weightdiff_safetensors "$ST" "$WD" compare "$WORK/pair/base" "$WORK/pair/ft" -o "$WORK/out-st" --quiet --no-lora
  run weightdiff_bin_zip "$BIN" "$WD" compare "$WORK/bin/base" "$WORK/bin/ft" -o "$WORK/out-bin" --quiet --no-lora
  run weightdiff_bin_legacy "$LEG" "$WD" compare "$WORK/bin-legacy/base" "$WORK/bin-legacy/ft" -o "$WORK/out-leg" --quiet --no-lora
  run python_torch_load "$BIN" "$PY" "$HERE/bench/torch_bin.py" compare "$WORK/bin/base/pytorch_model.bin" "$WORK/bin/ft/pytorch_model.bin"
done

# Same numbers from every reader (timing keys aside).
python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
def load(d):
    m = json.load(open(f"{w}/{d}/weight_differences.json"))["all_differences"]
    for v in m.values():
        for k in ("total_time", "compute_time", "reference_time", "speedup"):
            v.pop(k, None)
    return m
st = load("out-st")
for d in ("out-bin", "out-leg"):
    assert load(d) == st, f"{d} differs from the safetensors run"
print(f"metrics identical for {len(st)} tensors: safetensors, zip .bin, legacy .bin")
PY

python3 - "$RESULTS" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    n, ns, kb = line.split()
    rows.setdefault(n, []).append((int(ns) / 1e9, int(kb) / 1024))
med = {n: (statistics.median(t for t, _ in v), max(r for _, r in v)) for n, v in rows.items()}
print("| command | median s | peak RSS MiB | runs |")
print("| --- | --- | --- | --- |")
for n, (t, r) in med.items():
    print(f"| {n} | {t:.3f} | {r:.0f} | {len(rows[n])} |")
p = med["plain_pass_bin"][0]
print()
for n in ("weightdiff_bin_zip", "weightdiff_bin_legacy"):
    print(f"{n}: {med[n][0] / p:.2f}x the plain pass, {med[n][0] / med['weightdiff_safetensors'][0]:.2f}x the safetensors run, "
          f"{med['python_torch_load'][0] / med[n][0]:.1f}x faster than torch.load + torch metrics, "
          f"RSS {med[n][1] / med['python_torch_load'][1]:.3f}x of it")
PY
