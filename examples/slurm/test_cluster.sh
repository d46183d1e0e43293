#!/usr/bin/env bash
# Test of the SLURM example on a single-node cluster on localhost: starts munged,
# slurmctld and slurmd (2 CPUs), submits submit.sh for a builder pair with 3 shards,
# waits (bounded), checks the merged outputs equal a single-process run, and stops the
# daemons it started. Needs root and Debian's slurm-wlm + munge (.ci/run installs them).
#   usage: test_cluster.sh WEIGHTDIFF_BINARY
set -euo pipefail
WD=$(realpath "$1")
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d /tmp/wd-slurm.XXXXXX)
chmod 755 "$work"
conf=$work/slurm.conf
host=$(hostname -s)
mkdir -p "$work/spool" "$work/state" "$work/log"

cleanup() {
  scontrol shutdown > /dev/null 2>&1 || true
  sleep 1
  [ -n "${CTLD:-}" ] && kill "$CTLD" 2> /dev/null || true
  [ -n "${SLURMD:-}" ] && kill "$SLURMD" 2> /dev/null || true
  [ -n "${MUNGED_STARTED:-}" ] && pkill -x munged 2> /dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# munge: a key and the daemon (as its own user, as the package runs it).
if ! pgrep -x munged > /dev/null; then
  [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2> /dev/null; }
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge 2> /dev/null || true
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged
  MUNGED_STARTED=1
fi

cat > "$conf" <<CONF
ClusterName=wdtest
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
NodeName=$host CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$conf
/usr/sbin/slurmctld -D -f "$conf" > /dev/null 2>&1 &
CTLD=$!
/usr/sbin/slurmd -D -f "$conf" > /dev/null 2>&1 &
SLURMD=$!
for _ in $(seq 60); do
  sinfo -h -o %T 2> /dev/null | grep -qE '^idle' && break
  sleep 1
done
sinfo -h -o %T | grep -qE '^idle' || { echo "slurm did not come up:"; tail -20 "$work"/log/*.log; exit 1; }

# A builder pair, a single-process reference, then the sharded job.
"$WD" demo -o "$work/demo" --quiet
pair=$work/demo/pair
"$WD" compare "$pair/base" "$pair/finetuned" -o "$work/single" --quiet
WEIGHTDIFF=$WD "$here/submit.sh" "$pair/base" "$pair/finetuned" "$work/job" 3 > "$work/merge_id"
merge_id=$(cat "$work/merge_id")
for _ in $(seq 120); do
  state=$(sacct -n -X -j "$merge_id" -o State 2> /dev/null | head -n 1 | tr -d ' ' || true)
  [ -z "$state" ] && state=$(squeue -h -j "$merge_id" -o %T 2> /dev/null || true)
  [ -f "$work/job/merged/comparison_report.txt" ] && [ -z "$(squeue -h 2> /dev/null)" ] && break
  sleep 1
done
if [ ! -f "$work/job/merged/comparison_report.txt" ]; then
  echo "merge job did not finish in time"; squeue; cat "$work"/job/*.log 2> /dev/null; tail -20 "$work"/log/*.log; exit 1
fi

python3 - "$work/single" "$work/job/merged" <<'PY'
import json, sys
timing = {"total_time", "compute_time", "reference_time", "speedup", "time", "performance", "timings"}
def strip(o):
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if k not in timing}
    if isinstance(o, list):
        return [strip(x) for x in o]
    return o
single, merged = sys.argv[1], sys.argv[2]
bad = 0
for f in ["weight_differences.json", "lora_analysis.json", "lora_metadata.json", "architecture_comparison.json",
          "config_comparison.json", "lora_adapter/adapter_config.json"]:
    a = strip(json.load(open(f"{single}/{f}")))
    b = strip(json.load(open(f"{merged}/{f}")))
    for k in ("base", "finetuned", "base_model", "base_model_name_or_path"):
        a.pop(k, None); b.pop(k, None)
    if a != b:
        print(f"differs: {f}"); bad += 1
for f in ["lora_adapter/adapter_model.safetensors", "extracted_lora_weights.safetensors"]:
    if open(f"{single}/{f}", "rb").read() != open(f"{merged}/{f}", "rb").read():
        print(f"differs: {f}"); bad += 1
print(f"slurm: 3 shards + merge vs single run: {bad} files differ")
sys.exit(1 if bad else 0)
PY
