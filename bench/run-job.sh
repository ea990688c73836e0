#!/usr/bin/env bash
# Benchmarks of `run-job` (figures, not assertions):
#   1. throughput: a test phase printing SIZE bytes as fast as it can, run-job's stdout to
#      /dev/null, against `sh -c 'CMD > file'`; wall time and the agent's peak RSS;
#   2. per-phase overhead: a job of seven phases that each run `true`.
# Usage: bench/run-job.sh [SIZE_BYTES]   (default 1000000000)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-1000000000}
cargo build --release --quiet
bin=target/release/testflinger-agent
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmd="head -c $size /dev/zero"

cat > "$work/agent.yaml" <<YAML
agent_id: bench
server_address: http://127.0.0.1:9
job_queues: [bench]
execution_basedir: $work/run
logging_basedir: $work/logs
results_basedir: $work/results
logging_quiet: true
test_command: $cmd
YAML
printf 'job_queue: bench\ntest_data: {test_cmds: x}\n' > "$work/job.yaml"

seconds() { /usr/bin/time -f '%e %M' "$@" 2>&1 >/dev/null | tail -1; }

echo "== throughput: $size bytes ($cmd), 5 alternating rounds"
for round in 1 2 3 4 5; do
  read -r base_s base_kb < <(seconds sh -c "$cmd > $work/baseline.out")
  rm -f "$work/baseline.out"
  read -r agent_s agent_kb < <(seconds "$bin" run-job -c "$work/agent.yaml" "$work/job.yaml")
  logged=$(stat -c %s "$work"/run/*/test.log)
  rm -rf "$work/run"
  awk -v r="$round" -v a="$agent_s" -v b="$base_s" -v kb="$agent_kb" -v n="$logged" \
    'BEGIN { printf "round %d: sh -c CMD>file %.2f s; run-job %.2f s (ratio %.3f), agent peak RSS %d KiB, test.log %d bytes\n", r, b, a, (b > 0 ? a / b : 0), kb, n }'
done

echo "== per-phase overhead: 7 phases running true"
cat > "$work/agent7.yaml" <<YAML
agent_id: bench
server_address: http://127.0.0.1:9
job_queues: [bench]
execution_basedir: $work/run
logging_basedir: $work/logs
logging_quiet: true
setup_command: "true"
provision_command: "true"
firmware_update_command: "true"
test_command: "true"
allocate_command: "true"
reserve_command: "true"
cleanup_command: "true"
YAML
cat > "$work/job7.yaml" <<'YAML'
job_queue: bench
provision_data: {url: x}
firmware_update_data: {version: x}
test_data: {test_cmds: x}
allocate_data: {allocate: true}
reserve_data: {timeout: 1}
YAML
runs=20
start=$(date +%s%N)
for _ in $(seq $runs); do "$bin" run-job -c "$work/agent7.yaml" "$work/job7.yaml" >/dev/null; done
end=$(date +%s%N)
awk -v ns=$((end - start)) -v r=$runs 'BEGIN { printf "whole job (process start to exit): %.2f ms; per phase: %.2f ms\n", ns / r / 1e6, ns / r / 7 / 1e6 }'
"$bin" run-job -c "$work/agent7.yaml" "$work/job7.yaml" | awk '/ ran /{ sum += $4; n++ } END { printf "phase durations from the summary (spawn to reap): mean %.2f ms over %d phases\n", sum / n * 1000, n }'
