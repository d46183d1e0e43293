# Sourced by the bench scripts after they set REPS and WORK: paths, the Python peers of
# ../shared/bench (setup.sh makes the venv once), a release build, the qwen3-0.6b pair,
# and one timed run.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=${SHARED:-$HERE/../shared/bench}
# NO_PEERS=1: a script that runs no Python peer skips the venv (~6 GB with torch).
[ -n "${NO_PEERS:-}" ] || PY=$("$SHARED/setup.sh")
mkdir -p "$WORK"
cargo build --release --manifest-path "$HERE/Cargo.toml" >&2
WD=$HERE/target/release/weightdiff

# make_pair DIR [MAKE_PAIR_ARGS...]: the qwen3-0.6b pair of make_pair.py, made once.
make_pair() {
  local dir=$1; shift
  [ -f "$dir/ft/model.safetensors.index.json" ] || "$PY" "$SHARED/make_pair.py" --preset qwen3-0.6b --out "$dir" --quiet "$@"
}

# timed RESULTS NAME CMD...: runs CMD once and appends "NAME wall_ns peak_rss_kb" to
# RESULTS: wall time in ns (time's %e has 10 ms resolution), peak RSS from
# /usr/bin/time's %M. stdout goes to $WORK/stdout.txt; on failure stderr is shown and
# the script stops. Warming the page cache is the caller's job.
timed() {
  local results=$1 name=$2 t0 t1; shift 2
  t0=$(date +%s%N)
  /usr/bin/time -f "%M" -o "$WORK/time.txt" "$@" > "$WORK/stdout.txt" 2> "$WORK/stderr.txt" || { cat "$WORK/stderr.txt" >&2; exit 1; }
  t1=$(date +%s%N)
  echo "$name $(( t1 - t0 )) $(tail -n 1 "$WORK/time.txt")" >> "$results"
}
