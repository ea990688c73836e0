#!/usr/bin/env bash
# The .deb under a booted systemd: a Debian bookworm container (systemd-nspawn, systemd as
# its PID 1) installs the package and runs one agent, testflinger-agent@dut1, against the
# test suite's fake server (examples/fake-server.rs) on the host's loopback, which the
# container shares. Checks, each ending in a PASS or FAIL line:
#   1. install, enable --now: active, Status "waiting", a job completes, the journal keeps
#      the priorities (journalctl -p warning shows warnings, not the info lines);
#   2. systemctl stop in the middle of the test phase (a tree with a setsid escapee): the
#      tree is gone, cleanup ran once, the outcome reached the server, exit 0 in time;
#   3. the watchdog: WatchdogSec=6s and a SIGSTOPped agent: systemd kills and restarts it,
#      crash recovery reports the job;
#   5. the hardening drop-in: a job completes; `systemd-analyze security` with and without;
#   4. (last) an upgrade while a job runs, apt remove in the middle of a job, apt purge.
# The pristine root file system is cached outside the clone ($TESTFLINGER_CI_CACHE,
# default /var/cache/testflinger-agent-ci) and copied fresh for every run. The Debian
# mirror comes from this machine's apt sources (or $TESTFLINGER_CI_MIRROR).
# Needs root. When the container cannot be built or booted, it says why and fails under
# CI (CI set), and is skipped loudly elsewhere.
#   packaging/system-test.sh target/debian/testflinger-agent_0.1.0-1_amd64.deb
set -euo pipefail
cd "$(dirname "$0")/.."
started_at=$(date +%s)

deb="${1:?usage: packaging/system-test.sh DEB}"
[ -f "$deb" ] || { echo "system-test.sh: no such file: $deb" >&2; exit 2; }
deb="$(realpath "$deb")"
suite=bookworm
cache="${TESTFLINGER_CI_CACHE:-/var/cache/testflinger-agent-ci}"
rootfs_tar="$cache/rootfs-$suite.tar"
unit=testflinger-agent@dut1.service

# ---------------------------------------------------------------- reporting

failures=0
pass() { echo "PASS: $*"; }
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}
# The machine cannot run the test at all.
cannot_run() {
  echo "system-test.sh: cannot boot a systemd container here: $*" >&2
  if [ -n "${CI:-}" ]; then
    echo "FAIL: the booted-systemd test could not run (CI is set, so this is a failure)"
    exit 1
  fi
  printf '\n%s\nSKIPPED: the booted-systemd test (%s)\n%s\n' \
    "********************************************************************" "$*" \
    "********************************************************************"
  exit 0
}
elapsed() { echo $(($(date +%s) - started_at)); }

# ---------------------------------------------------------------- prerequisites

[ "$(id -u)" -eq 0 ] || cannot_run "it needs root (debootstrap, systemd-nspawn, nsenter)"
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
command -v nsenter >/dev/null || missing+=(util-linux)
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing ${missing[*]}"
  timeout 600 apt-get update </dev/null >/dev/null ||
    cannot_run "apt-get update failed (needed for ${missing[*]})"
  timeout 600 env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    "${missing[@]}" </dev/null >/dev/null || cannot_run "cannot install ${missing[*]}"
fi

# The first Debian archive URL that serves $suite, from this machine's apt sources (deb822
# .sources files and one-line .list files).
apt_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v suite="$suite" '
      function flush() {
        if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris != "") {
          split(uris, u, " "); print u[1]; found = 1; exit
        }
        types = ""; suites = ""; uris = ""
      }
      /^[ \t]*$/ { flush(); next }
      /^Types:/ { sub(/^Types:[ \t]*/, ""); types = $0 }
      /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
      /^URIs:/ { sub(/^URIs:[ \t]*/, ""); uris = $0 }
      END { if (!found) flush() }' "$f"
  done
  { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } |
    sed -e 's/#.*//' -e 's/\[[^]]*\]//' |
    awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2 }'
}

# ---------------------------------------------------------------- the root file system

if [ ! -f "$rootfs_tar" ]; then
  mirror="${TESTFLINGER_CI_MIRROR:-$(apt_mirror | head -n 1 || true)}"
  [ -n "$mirror" ] || cannot_run "no apt source for Debian $suite on this machine (set TESTFLINGER_CI_MIRROR)"
  echo "== debootstrap $suite from $mirror into the cache $cache (once per machine)"
  mkdir -p "$cache"
  build="$(mktemp -d "$cache/build.XXXXXX")"
  # ca-certificates and openssh-client are the package's Recommends: present, so that
  # `apt install ./DEB` needs no network inside.
  if ! timeout 900 debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,procps,ca-certificates,openssh-client \
    "$suite" "$build/root" "$mirror" >"$build/debootstrap.log" 2>&1; then
    tail -n 20 "$build/debootstrap.log" >&2
    rm -rf "$build"
    cannot_run "debootstrap failed (log above)"
  fi
  tar --numeric-owner -C "$build/root" -cf "$build/rootfs.tar" .
  mv "$build/rootfs.tar" "$rootfs_tar"
  rm -rf "$build"
  echo "== cached $rootfs_tar ($(du -h "$rootfs_tar" | cut -f1)) after $(elapsed) s"
fi

# ---------------------------------------------------------------- teardown

nspawn_pid=""
container_pid=""
server_pid=""
work=""
root=""
root_mounted=""
teardown() {
  local status=$?
  set +e
  if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
    # SIGTERM asks nspawn for a clean shutdown of the container's systemd; then SIGKILL
    # to the container's PID 1 ends everything in its PID namespace.
    kill -TERM "$nspawn_pid" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$nspawn_pid" 2>/dev/null; then
      [ -n "$container_pid" ] && kill -KILL "$container_pid" 2>/dev/null
      kill -KILL "$nspawn_pid" 2>/dev/null
    fi
    wait "$nspawn_pid" 2>/dev/null
    echo "system-test.sh: container stopped at $(elapsed) s"
  fi
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
  fi
  if [ "$status" -ne 0 ] && [ -n "$work" ] && [ -f "$work/console.log" ]; then
    echo "-- the container's console (last lines):" >&2
    tail -n 30 "$work/console.log" >&2
  fi
  [ -n "$root_mounted" ] && umount "$root"
  # Nothing of the container may be mounted any more before its files go.
  if [ -z "$work" ]; then
    :
  elif ! grep -q " $root" /proc/self/mounts; then
    rm -rf "$work"
  else
    echo "system-test.sh: $root still has mounts; left in place" >&2
  fi
  echo "system-test.sh: total run time $(elapsed) s"
  exit "$status"
}
trap teardown EXIT
trap 'exit 130' INT TERM

work="$(mktemp -d /var/tmp/tf-system-test.XXXXXX)"
root="$work/root"
mkdir "$root"
# On a tmpfs of its own when possible: unpacked and thrown away in a moment, where a disk
# under load takes tens of seconds for the 10,000 files.
if mount -t tmpfs -o size=2g,mode=0755 tmpfs "$root" 2>/dev/null; then root_mounted=1; fi
tar --numeric-owner -C "$root" -xf "$rootfs_tar"
echo "== fresh root file system in $root ($(elapsed) s)"

# ---------------------------------------------------------------- the fake server

echo "== the fake server (cargo build --example fake-server)"
cargo build --locked --example fake-server >"$work/cargo.log" 2>&1 ||
  { tail -n 30 "$work/cargo.log" >&2; echo "FAIL: cannot build the fake server"; exit 1; }
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
"$target_dir/debug/examples/fake-server" --url-file "$work/url" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do [ -s "$work/url" ] && break; sleep 0.1; done
[ -s "$work/url" ] || { echo "FAIL: the fake server did not start"; exit 1; }
url="$(cat "$work/url")"
echo "fake server at $url"

# POST /v1/job; prints the job id.
submit() {
  curl -sS --max-time 10 -H 'Content-Type: application/json' \
    -d "{\"job_queue\": \"systest\", \"test_data\": {\"test_cmds\": \"systest-mode-$1\"}}" \
    "$url/v1/job" | python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])'
}
# GET /v1/result/<id>, one field (empty when absent).
result() {
  curl -sS --max-time 10 "$url/v1/result/$1" | python3 -c '
import json, sys
text = sys.stdin.read()
value = json.loads(text).get(sys.argv[1], "") if text.strip() else ""
print(value if isinstance(value, str) else json.dumps(value))' "$2"
}
# Waits up to $2 s for job $1 to be complete (or cancelled) with its outcome posted.
# Looks at least once, so `wait_finished ID 0` asks whether it is finished now.
wait_finished() {
  local deadline=$(($(date +%s) + $2)) state
  while :; do
    state="$(result "$1" job_state 2>/dev/null || true)"
    if { [ "$state" = complete ] || [ "$state" = cancelled ]; } &&
      [ -n "$(result "$1" cleanup_status 2>/dev/null || true)" ]; then
      return 0
    fi
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}

# ---------------------------------------------------------------- boot

echo "== boot: systemd-nspawn -b"
systemd-nspawn --register=no --keep-unit --console=passive --machine="tfsys$$" \
  -D "$root" -b >"$work/console.log" 2>&1 &
nspawn_pid=$!
# The container's PID 1: the descendant of nspawn whose pid in its own namespace is 1.
for _ in $(seq 1 150); do
  for p in $(ps -o pid= --ppid "$nspawn_pid" 2>/dev/null); do
    if awk '/^NSpid:/ { exit !($NF == 1) }' "/proc/$p/status" 2>/dev/null; then
      container_pid=$p
    fi
  done
  [ -n "$container_pid" ] && break
  kill -0 "$nspawn_pid" 2>/dev/null || break
  sleep 0.2
done
[ -n "$container_pid" ] || cannot_run "systemd-nspawn did not start a container ($(tail -n 3 "$work/console.log" | tr '\n' ' '))"

# A command inside the container, with a clean environment.
inside() {
  nsenter -t "$container_pid" -a -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"
}
state=""
for _ in $(seq 1 300); do
  state="$(inside systemctl is-system-running 2>/dev/null || true)"
  case "$state" in running | degraded) break ;; esac
  sleep 0.2
done
case "$state" in
  running | degraded) echo "container systemd (pid $container_pid on the host) is $state after $(elapsed) s" ;;
  *) cannot_run "the container's systemd did not come up (state: ${state:-none})" ;;
esac

# ---------------------------------------------------------------- helpers inside

show() { inside systemctl show -P "$1" "$unit"; }
main_pid() { show MainPID; }
# Waits up to $1 s for the unit's MainPID to be non-zero and different from $2.
wait_new_main_pid() {
  local deadline=$(($(date +%s) + $1)) pid
  while [ "$(date +%s)" -lt "$deadline" ]; do
    pid="$(main_pid)"
    if [ "$pid" != 0 ] && [ "$pid" != "${2:-0}" ] && [ "$(show ActiveState)" = active ]; then
      echo "$pid"
      return 0
    fi
    sleep 0.5
  done
  return 1
}
# Waits up to $2 s for the unit's Status text to be $1.
wait_status() {
  local deadline=$(($(date +%s) + $2))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    [ "$(show StatusText)" = "$1" ] && return 0
    sleep 0.5
  done
  return 1
}
# Waits up to $2 s for the test phase of job $1 to have started (the file it writes).
wait_test_started() {
  local deadline=$(($(date +%s) + $2))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    [ -f "$root/var/lib/testflinger-agent/dut1/run/$1/systest-started" ] && return 0
    sleep 0.3
  done
  return 1
}
# Host processes (the container's included) whose environment carries job $1's marker.
marked() {
  { grep -lsa "TF_SYSTEST_MARK=$1" /proc/[0-9]*/environ 2>/dev/null || true; } | cut -d/ -f3 | tr '\n' ' '
}
cleanups() { grep -c "^$1\$" "$root/var/lib/testflinger-agent/dut1/cleanups" 2>/dev/null || true; }
journal_tail() { inside journalctl -u "$unit" --no-pager -n "${1:-25}" -o short-precise >&2 || true; }

# ---------------------------------------------------------------- agent files

# The test phase: what it does is named in the job's test_data.test_cmds.
install -D -m 0755 /dev/stdin "$root/usr/local/bin/tf-systest-test" <<'EOF'
#!/bin/sh
job="$(basename "$PWD")"
export TF_SYSTEST_MARK="$job"
mode="$(grep -o 'systest-mode-[a-z]*' testflinger.json | head -n 1)"
: >systest-started
case "$mode" in
  systest-mode-quick) echo "quick test ran" ;;
  systest-mode-slow)
    for i in $(seq 1 20); do echo "slow test: $i"; sleep 1; done
    echo "slow test done" ;;
  systest-mode-hang)
    setsid sh -c 'while :; do sleep 1; done' </dev/null >/dev/null 2>&1 &
    echo "hanging (escapee started)"
    while :; do sleep 1; done ;;
  *) echo "unknown mode: $mode"; exit 3 ;;
esac
EOF
install -D -m 0755 /dev/stdin "$root/usr/local/bin/tf-systest-cleanup" <<'EOF'
#!/bin/sh
echo "cleanup ran"
basename "$PWD" >>/var/lib/testflinger-agent/dut1/cleanups
EOF
cp "$deb" "$root/var/tmp/testflinger-agent.deb"

# ================================================================= 1. install and a job
echo "== 1. apt install, systemctl enable --now, a job"
if inside apt-get install -y /var/tmp/testflinger-agent.deb >"$work/install.log" 2>&1; then
  pass "apt install ./$(basename "$deb")"
else
  tail -n 20 "$work/install.log"
  fail "apt install ./$(basename "$deb")"
  exit 1
fi
cat >"$root/etc/testflinger-agent/dut1.yaml" <<EOF
agent_id: dut1
server_address: $url
job_queues: [systest]
polling_interval: 1
execution_basedir: /var/lib/testflinger-agent/dut1/run
results_basedir: /var/lib/testflinger-agent/dut1/results
logging_basedir: /var/log/testflinger-agent/dut1
termination_grace_period: 3
setup_command: echo "setup on \$(hostname)"
test_command: /usr/local/bin/tf-systest-test
cleanup_command: /usr/local/bin/tf-systest-cleanup
EOF
inside chgrp testflinger /etc/testflinger-agent/dut1.yaml
inside chmod 0640 /etc/testflinger-agent/dut1.yaml
inside install -d -m 0750 -o testflinger -g testflinger /var/lib/testflinger-agent/dut1
printf '{"refresh_token": "fake-refresh-token", "obtained_at": "2026-01-01T00:00:00"}\n' \
  >"$root/var/lib/testflinger-agent/dut1/refresh_token"
inside chown testflinger:testflinger /var/lib/testflinger-agent/dut1/refresh_token
inside chmod 0600 /var/lib/testflinger-agent/dut1/refresh_token
# What an operator keeps beside the agent: ssh keys for the devices.
inside install -d -m 0700 -o testflinger -g testflinger /var/lib/testflinger-agent/.ssh
echo "not a real key" >"$root/var/lib/testflinger-agent/.ssh/id_ed25519"

if inside systemctl enable --now "$unit" >"$work/enable.log" 2>&1 && pid1="$(wait_new_main_pid 60)"; then
  pass "systemctl enable --now $unit: active, main pid $pid1 (in the container)"
else
  cat "$work/enable.log"
  journal_tail
  fail "systemctl enable --now $unit: not active"
  exit 1
fi
if wait_status waiting 60; then
  pass "the unit's Status is \"waiting\" (sd_notify STATUS=)"
else
  fail "the unit's Status is \"$(show StatusText)\", not \"waiting\""
fi
job="$(submit quick)"
if wait_finished "$job" 90 && [ "$(result "$job" test_status)" = 0 ] &&
  grep -q 'quick test ran' <<<"$(result "$job" test_output)"; then
  pass "job $job completed (test_status 0, its output on the server)"
else
  journal_tail
  fail "job $job did not complete: job_state $(result "$job" job_state), test_status $(result "$job" test_status)"
fi
# ================================================================= 2. stop mid-phase
echo "== 2. systemctl stop in the middle of the test phase"
job="$(submit hang)"
if wait_test_started "$job" 60; then
  sleep 1
  tree="$(marked "$job")"
  [ "$(wc -w <<<"$tree")" -ge 2 ] || fail "the test phase's tree (with its escapee) is not running: pids [$tree]"
  timeout_stop="$(show TimeoutStopUSec)"
  t0=$(date +%s.%N)
  if inside systemctl stop "$unit"; then stop_rc=0; else stop_rc=$?; fi
  t1=$(date +%s.%N)
  took="$(python3 -c "print(f'{$t1 - $t0:.2f}')")"
  # Read the moment the stop returned: the agent exits only after cleanup and the report.
  cleanups_at_stop="$(cleanups "$job")"
  finished_at_stop=no
  wait_finished "$job" 0 && finished_at_stop=yes
  left="$(marked "$job")"
  exit_status="$(show ExecMainStatus)"
  unit_result="$(show Result)"
  if [ "$stop_rc" -eq 0 ] && [ "$exit_status" = 0 ] && [ "$unit_result" = success ]; then
    pass "systemctl stop: exit 0 in $took s (TimeoutStopSec $timeout_stop), unit result success"
  else
    fail "systemctl stop: rc $stop_rc, agent exit status $exit_status, unit result $unit_result, $took s"
  fi
  if [ -z "$left" ]; then pass "the phase's tree ([$tree], escapee included) is gone"; else fail "left running: [$left]"; fi
  if [ "$finished_at_stop" = yes ] && [ "$cleanups_at_stop" = 1 ] &&
    [ -n "$(result "$job" test_status)" ] && [ "$(result "$job" test_status)" != 0 ]; then
    pass "when systemctl stop returned, cleanup had run once and the outcome was on the server (test_status $(result "$job" test_status), job_state $(result "$job" job_state))"
  else
    journal_tail
    fail "when systemctl stop returned: cleanups $cleanups_at_stop, outcome on the server: $finished_at_stop (job_state $(result "$job" job_state), test_status $(result "$job" test_status))"
  fi
  # The stop as the journal timed it: from the agent's signal line to systemd's "Stopped".
  inside journalctl -u "$unit" --no-pager -o short-precise --since "-60s" |
    grep -E 'signal 15|cleanup starting|reported|Stopped' | tail -n 4 || true
else
  journal_tail
  fail "the test phase of job $job did not start"
fi

# Priorities: the agent's lines reach the journal at their own level. By now it has logged
# warnings (the stop above); at warning and above there are only those, never its info
# lines, which are there at info.
agent_journal() { inside journalctl -u "$unit" -t testflinger-agent --no-pager -o cat "$@"; }
all_lines="$(agent_journal)"
warn_lines="$(agent_journal -p warning)"
n_all="$(grep -c . <<<"$all_lines" || true)"
n_warn="$(grep -c . <<<"$warn_lines" || true)"
n_info="$(grep -c '^INFO' <<<"$all_lines" || true)"
if [ "$n_warn" -gt 0 ] && ! grep -qv '^\(WARN\|ERROR\)' <<<"$warn_lines" && [ "$n_info" -gt 0 ]; then
  pass "journalctl -p warning: $n_warn of the agent's $n_all lines, all WARN or ERROR (e.g. \"$(head -n 1 <<<"$warn_lines" | cut -c1-80)\"), none of its $n_info INFO lines"
else
  echo "-- all:"; tail -n 15 <<<"$all_lines"
  echo "-- -p warning:"; tail -n 15 <<<"$warn_lines"
  fail "journalctl -p warning does not hold exactly the agent's warnings and errors"
fi

# ================================================================= 3. the watchdog
echo "== 3. the watchdog: WatchdogSec=6s, the agent SIGSTOPped in a job"
mkdir -p "$root/etc/systemd/system/$unit.d"
cat >"$root/etc/systemd/system/$unit.d/watchdog.conf" <<'EOF'
[Service]
WatchdogSec=6s
TimeoutAbortSec=15s
EOF
inside systemctl daemon-reload
inside systemctl start "$unit"
if pid="$(wait_new_main_pid 60)" && wait_status waiting 60; then
  restarts_before="$(show NRestarts)"
  job="$(submit slow)"
  if wait_test_started "$job" 60; then
    inside kill -STOP "$pid"
    echo "agent (pid $pid in the container) stopped with SIGSTOP"
    if new_pid="$(wait_new_main_pid 90 "$pid")"; then
      pass "systemd restarted the silent agent: pid $pid -> $new_pid, NRestarts $restarts_before -> $(show NRestarts)"
    else
      journal_tail
      fail "the SIGSTOPped agent was not restarted (MainPID $(main_pid), NRestarts $(show NRestarts))"
    fi
    if grep -qi 'watchdog timeout' <<<"$(inside journalctl -u "$unit" --no-pager -o cat)"; then
      pass "the journal names the watchdog timeout"
    else
      fail "no watchdog timeout in the journal"
    fi
    if wait_finished "$job" 90 && [ "$(cleanups "$job")" = 1 ] && [ -n "$(result "$job" test_status)" ]; then
      pass "crash recovery reported job $job (test_status $(result "$job" test_status), cleanup ran once)"
    else
      journal_tail 40
      fail "crash recovery: job_state $(result "$job" job_state), test_status $(result "$job" test_status), cleanups $(cleanups "$job")"
    fi
  else
    fail "the test phase of job $job did not start"
  fi
else
  journal_tail
  fail "the agent did not start with the watchdog drop-in"
fi
rm -f "$root/etc/systemd/system/$unit.d/watchdog.conf"
inside systemctl daemon-reload
inside systemctl stop "$unit"

# ================================================================= 5. hardening
echo "== 5. the hardening drop-in"
# "→ Overall exposure level for UNIT: 8.3 EXPOSED 🙁": the number and the word.
score() {
  grep -o 'Overall exposure level for [^ ]*: [0-9.]* [A-Z]*' \
    <<<"$(inside systemd-analyze security --no-pager "$unit" 2>/dev/null)" | awk '{ print $(NF-1), $NF }'
}
score_without="$(score)"
inside install -D -m 0644 /usr/share/testflinger-agent/hardening.conf \
  /etc/systemd/system/testflinger-agent@.service.d/hardening.conf
inside systemctl daemon-reload
score_with="$(score)"
echo "systemd-analyze security $unit: without the drop-in $score_without, with it $score_with"
inside systemctl start "$unit"
if wait_new_main_pid 60 >/dev/null && wait_status waiting 60; then
  job="$(submit quick)"
  if wait_finished "$job" 90 && [ "$(result "$job" test_status)" = 0 ] && [ "$(cleanups "$job")" = 1 ]; then
    pass "with hardening.conf, job $job completed (test_status 0, cleanup ran); exposure $score_without -> $score_with"
  else
    journal_tail
    fail "with hardening.conf, job $job: job_state $(result "$job" job_state), test_status $(result "$job" test_status)"
  fi
else
  journal_tail
  fail "the agent did not start with hardening.conf"
fi
inside systemctl stop "$unit"
rm -f "$root/etc/systemd/system/testflinger-agent@.service.d/hardening.conf"
inside systemctl daemon-reload
inside systemctl start "$unit"
wait_status waiting 60 || fail "the agent did not come back without hardening.conf"

# ================================================================= 4. upgrade, remove, purge
echo "== 4. an upgrade while a job runs, then apt remove mid-job, then apt purge"
operator_files=(/etc/testflinger-agent/dut1.yaml /var/lib/testflinger-agent/dut1/refresh_token
  /var/lib/testflinger-agent/.ssh/id_ed25519)
sums() { (cd "$root" && for f in "${operator_files[@]}"; do sha256sum ".$f"; stat -c '%n %a %U:%G' ".$f"; done) 2>&1; }
sums_before="$(sums)"
# The same package with the version bumped: a newer build, no second compile.
old_version="$(dpkg-deb -f "$deb" Version)"
new_version="$old_version+systest1"
dpkg-deb -R "$deb" "$work/bumped"
sed -i "s/^Version: .*/Version: $new_version/" "$work/bumped/DEBIAN/control"
dpkg-deb --root-owner-group -b "$work/bumped" "$root/var/tmp/testflinger-agent-new.deb" >/dev/null

pid="$(main_pid)"
job="$(submit slow)"
if wait_test_started "$job" 60; then
  if inside apt-get install -y /var/tmp/testflinger-agent-new.deb >"$work/upgrade.log" 2>&1 &&
    [ "$(inside dpkg-query -W -f '${Version}' testflinger-agent)" = "$new_version" ]; then
    pass "apt install of $new_version while job $job runs"
  else
    tail -n 20 "$work/upgrade.log"
    fail "apt install of $new_version"
  fi
  exe="$(inside readlink "/proc/$pid/exe")"
  if [ "$(main_pid)" = "$pid" ] && [ -z "$(result "$job" test_status)" ]; then
    pass "the running agent (pid $pid, now running \"$exe\") was left alone mid-job"
  else
    fail "the upgrade disturbed the agent: MainPID $pid -> $(main_pid), test_status $(result "$job" test_status)"
  fi
  if wait_finished "$job" 90 && [ "$(result "$job" test_status)" = 0 ] &&
    grep -q 'slow test done' <<<"$(result "$job" test_output)"; then
    pass "job $job completed across the upgrade (test_status 0, the whole output)"
  else
    journal_tail
    fail "job $job across the upgrade: job_state $(result "$job" job_state), test_status $(result "$job" test_status)"
  fi
  # The restart between jobs operating.md gives: SIGUSR1 to the agent alone.
  inside systemctl kill --kill-whom=main --signal=SIGUSR1 "$unit"
  if new_pid="$(wait_new_main_pid 90 "$pid")"; then
    new_exe="$(inside readlink "/proc/$new_pid/exe")"
    new_inode="$(inside stat -L -c %i "/proc/$new_pid/exe")"
    file_inode="$(inside stat -c %i /usr/bin/testflinger-agent)"
    if [ "$new_exe" = /usr/bin/testflinger-agent ] && [ "$new_inode" = "$file_inode" ]; then
      pass "after SIGUSR1 the new binary runs: pid $new_pid, /usr/bin/testflinger-agent inode $file_inode (the old agent ran \"$exe\")"
    else
      fail "after the restart: exe \"$new_exe\" inode $new_inode, installed inode $file_inode"
    fi
  else
    journal_tail
    fail "the agent did not restart after SIGUSR1"
  fi
else
  fail "the test phase of job $job did not start"
fi
if [ "$(sums)" = "$sums_before" ]; then
  pass "the upgrade left the operator's files alone: ${operator_files[*]}"
else
  diff <(echo "$sums_before") <(sums)
  fail "the upgrade changed the operator's files"
fi

wait_status waiting 60 || true
job="$(submit hang)"
if wait_test_started "$job" 60; then
  sleep 1
  inside apt-get remove -y testflinger-agent >"$work/remove.log" 2>&1 || fail "apt remove failed"
  if grep -q "stopping $unit" "$work/remove.log"; then
    pass "apt remove says: $(grep "stopping $unit" "$work/remove.log")"
  else
    cat "$work/remove.log"
    fail "apt remove did not say it stops $unit"
  fi
  left="$(marked "$job")"
  # Read the moment apt returned: its prerm waited for the stop.
  if [ "$(show ActiveState)" = inactive ] && [ -z "$left" ] && wait_finished "$job" 0 &&
    [ "$(cleanups "$job")" = 1 ] && [ -n "$(result "$job" test_status)" ]; then
    pass "apt remove stopped the agent as systemctl stop does: when it returned, the tree was gone, cleanup had run once, test_status $(result "$job" test_status) was on the server"
  else
    fail "apt remove: unit $(show ActiveState), left [$left], cleanups $(cleanups "$job"), job_state $(result "$job" job_state)"
  fi
else
  fail "the test phase of job $job did not start"
fi
if [ ! -e "$root/usr/bin/testflinger-agent" ] && [ "$(sums)" = "$sums_before" ]; then
  pass "after apt remove: the binary is gone, the operator's files are as they were"
else
  fail "after apt remove: binary present or operator files changed"
fi
inside apt-get purge -y testflinger-agent >"$work/purge.log" 2>&1 || fail "apt purge failed"
grep 'testflinger-agent:' "$work/purge.log" || true
gone=(/usr/bin/testflinger-agent /usr/lib/systemd/system/testflinger-agent@.service
  /usr/lib/sysusers.d/testflinger-agent.conf /usr/lib/tmpfiles.d/testflinger-agent.conf
  /usr/share/testflinger-agent /usr/share/doc/testflinger-agent /var/log/testflinger-agent)
still=()
for p in "${gone[@]}"; do [ -e "$root$p" ] && still+=("$p"); done
dpkg_status="$(inside dpkg-query -W -f '${Status}' testflinger-agent 2>/dev/null || echo "not known to dpkg")"
if [ "${#still[@]}" -eq 0 ] && [ "$dpkg_status" = "not known to dpkg" ] &&
  [ "$(sums)" = "$sums_before" ]; then
  pass "apt purge removed the package's files and the agents' logs, and kept the operator's: ${operator_files[*]}"
else
  fail "apt purge: still present [${still[*]}], dpkg says \"$dpkg_status\", or the operator's files changed"
fi

# ================================================================= summary
echo "== summary"
echo "security: systemd-analyze security $unit: without hardening.conf ${score_without:-?}, with it ${score_with:-?}"
if [ "$failures" -gt 0 ]; then
  echo "system-test.sh: $failures check(s) FAILED ($(elapsed) s)"
  exit 1
fi
echo "system-test.sh: all checks passed ($(elapsed) s)"
