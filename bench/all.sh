#!/usr/bin/env bash
# The benchmark suite: every figure beside its limit measured in the same run (issue 10).
# Builds, runs the producers, then bench/collect.py prints the table and writes the JSON;
# exits non-zero when a figure is missing or a producer failed (it never judges the
# figures themselves: a figure short of its target is a "NO" in the table, not a failure).
#
#   bench/all.sh [--smoke] [--json PATH] [--note TEXT] [--profile release|dev]
#
#   --smoke    about 10 s of measuring: small sizes, one round, 5 runs per tree shape,
#              10 agents, short windows; what CI runs. Default build: the dev profile
#              (CI's `cargo test` has built it), so the figures are a debug build's.
#   --json     where the JSON goes (default: bench/results.json for a full run, which
#              bench/README.md's performance table is rendered from; target/bench/smoke.json for
#              --smoke)
#   --note     a sentence recorded with the figures (e.g. what else loaded the machine)
#   --profile  the cargo profile to build and measure (default: release; dev for --smoke)
#
# TF_BENCH_SERVER="KITDIR:PORT[ KITDIR:PORT]": also measure against running copies of the
# real-server kit (../shared/realserver), e.g. "/tmp/tfserver:5000 /tmp/tfserver-new:5100":
# a 200 MB test phase through the agent beside the kit's bare ingest client, in the same
# run, five rounds of each alternated and the best of each kept (bench/realserver.py).
# Each server is probed for GET /v1/result/<id>/status and its figures are named
# `realserver_status_*` or `realserver_old_*`; their details say which server, commit and
# machine.
#
# The run-job figures run on a tmpfs: /dev/shm when it is one, else a tmpfs mounted for
# the run (root only); the agents' directories in the other figures are there too. The
# run-job throughput figures are measured again on the disk /tmp is on (names `*_disk`).
# After a full run: UPDATE_GENERATED=1 cargo test --test it docs:: rewrites bench/README.md's table.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=full json= note= profile=
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) mode=smoke ;;
    --json) json="${2:?--json needs a path}"; shift ;;
    --note) note="${2:?--note needs a text}"; shift ;;
    --profile) profile="${2:?--profile needs a name}"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "bench/all.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$profile" ]; then profile=$([ "$mode" = smoke ] && echo dev || echo release); fi
if [ -z "$json" ]; then json=$([ "$mode" = smoke ] && echo target/bench/smoke.json || echo bench/results.json); fi
smoke=(); [ "$mode" = smoke ] && smoke=(--smoke)
started=$(date +%s)

# A tmpfs to run on.
mounted=
if [ "$(stat -f -c %T /dev/shm 2>/dev/null)" = tmpfs ] && [ -w /dev/shm ]; then
  base=/dev/shm tmpfs="/dev/shm (tmpfs)"
elif [ "$(id -u)" -eq 0 ]; then
  base=$(mktemp -d) && mount -t tmpfs -o size=4g tmpfs "$base" && mounted=$base
  tmpfs="a tmpfs mounted on $base for the run"
else
  echo "bench/all.sh: /dev/shm is no writable tmpfs and only root can mount one" >&2; exit 2
fi
work=$(mktemp -d "$base/tf-bench.XXXXXX")
diskwork=
cleanup() {
  rm -rf "$work"
  if [ -n "$diskwork" ]; then rm -rf "$diskwork"; fi
  if [ -n "$mounted" ]; then umount "$mounted" && rmdir "$mounted"; fi
}
trap cleanup EXIT

echo "== build ($profile profile)"
benches=(--bench process --bench suite)
case "$profile" in
  release) cargo build --release --locked --quiet
           cargo bench --no-run --locked --quiet "${benches[@]}"
           cargo_bench=(cargo bench --locked --quiet); bin=target/release/testflinger-agent ;;
  dev)     cargo build --locked --quiet
           cargo bench --profile dev --no-run --locked --quiet "${benches[@]}"
           cargo_bench=(cargo bench --profile dev --locked --quiet); bin=target/debug/testflinger-agent ;;
  *) echo "bench/all.sh: --profile is release or dev" >&2; exit 2 ;;
esac

# What else is loading the machine shows here (the table records it).
load=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== load average before measuring: $load"
log="$work/figures.log"
: > "$log"
failed=()
# Runs one producer, its output on the terminal and in the log.
produce() {
  local name=$1; shift
  echo "== $name: $*"
  local t0; t0=$(date +%s)
  set +e
  "$@" 2>&1 | tee -a "$log"
  local status=${PIPESTATUS[0]}
  set -e
  echo "($name: exit $status, $(( $(date +%s) - t0 )) s)"
  [ "$status" -eq 0 ] || failed+=("$name")
}

# The quietest first: the run-job ratio is the most sensitive to other load.
produce run-job python3 bench/run_job.py --bin "$bin" --dir "$work" "${smoke[@]}"
# The same on the disk /tmp is on (/var/tmp when /tmp is a tmpfs).
disk=${TMPDIR:-/tmp}
[ "$(stat -f -c %T "$disk")" = tmpfs ] && disk=/var/tmp
diskwork=$(mktemp -d "$disk/tf-bench-disk.XXXXXX")
produce run-job-disk python3 bench/run_job.py --bin "$bin" --dir "$diskwork" --suffix _disk "${smoke[@]}"
produce daemon "${cargo_bench[@]}" --bench suite -- daemon --dir "$work" "${smoke[@]}"
produce process "${cargo_bench[@]}" --bench process -- "${smoke[@]}"
produce idle "${cargo_bench[@]}" --bench suite -- idle --dir "$work" "${smoke[@]}"
produce fleet "${cargo_bench[@]}" --bench suite -- fleet --dir "$work" "${smoke[@]}"

for kit in ${TF_BENCH_SERVER:-}; do
  dir=${kit%:*} port=${kit##*:}
  code=$(curl -s -o /dev/null -w '%{http_code}' \
    "http://127.0.0.1:$port/v1/result/00000000-0000-4000-8000-000000000000/status" || true)
  kind=$([ "$code" = 404 ] && echo old || echo status)
  size=200; [ "$mode" = smoke ] && size=20
  rounds=5; [ "$mode" = smoke ] && rounds=1
  produce "realserver-$kind" python3 bench/realserver.py --kit "$dir" --port "$port" \
    --agent "$bin" --label "$kind" --size-mb "$size" --rounds "$rounds"
done

echo "== measured in $(( $(date +%s) - started )) s (with the build)"
python3 bench/collect.py --log "$log" --json "$json" --mode "$mode" --build "$profile" \
  --tmpfs "$tmpfs" --load "$load" --note "$note" --failed "${failed[*]}"
