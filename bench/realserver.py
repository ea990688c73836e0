#!/usr/bin/env python3
"""A large test phase through the agent into a real Testflinger server (the kit in
../shared/realserver), beside that server's bare ingest limit, in the same run.

  bench/realserver.py --kit DIR --port PORT --agent BIN [--size-mb 200] [--label NAME]
                      [--rounds 3] [--cancel]

One round: (1) the kit's bin/ingest-bench.py posts SIZE_MB x 1 MiB fragments on one
connection (the bare client); (2) the agent (one daemon for all rounds) takes one job whose
test phase prints SIZE_MB of 100-byte lines (allocate and reserve have commands but no
data: skipped), and runs it to completion. Every figure comes from the server's own request
log (DIR/logs/requests.log: arrival time and duration of each request):

  live       test bytes / (end of the last test fragment - the `test` job_state post)
  job        test bytes / (the next job_state post - the `test` job_state post)
  switch     the next job_state post - the end of the last test fragment (ms)
  bare       what ingest-bench.py printed (MB/s, 1 MB = 1e6 bytes)

The rounds alternate the two, and each rate figure is the best of its rounds, as run-job's
are the fastest of theirs: on a shared machine a neighbour's burst slows one round of
either side by a third or more, and the best rounds are the ones it spared. The switch is
the median of the rounds. Each round's own figures are printed too.

With --cancel, a second job is cancelled during its test phase instead, and the lines of
the request log for it (state reads and job_state posts) are printed.

Prints `FIGURE name=value unit=...` lines (names carry --label) and the state-read lines
of the request log that show which endpoint the agent used. Asserts nothing.
"""
import argparse, json, os, re, statistics, subprocess, sys, tempfile, time, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--kit", required=True)
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--agent", required=True)
ap.add_argument("--size-mb", type=int, default=200)
ap.add_argument("--label", default="")
ap.add_argument("--rounds", type=int, default=1)
ap.add_argument("--cancel", action="store_true")
a = ap.parse_args()
rounds = max(a.rounds, 1)
base = f"http://127.0.0.1:{a.port}"
reqlog = os.path.join(a.kit, "logs", "requests.log")
label = a.label or f"port{a.port}"


def commit_of(kit):
    try:
        return open(os.path.join(kit, "src", "COMMIT")).read().strip()[:8]
    except OSError:
        return "?"


DETAILS = (f"server={base} commit={commit_of(a.kit)} host={os.uname().nodename} "
           f"bytes={a.size_mb * 1_000_000} rounds={rounds}")


def figure(name, value, unit):
    print(f"FIGURE realserver_{label}_{name}={value:.3f} unit={unit} {DETAILS}", flush=True)


def api(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        raw = r.read()
        return r.status, raw


def log_lines(job_id):
    out = []
    with open(reqlog) as f:
        for line in f:
            if job_id in line:
                p = line.split()
                out.append((float(p[0]), p[1], p[2], p[3], float(p[4]), p[-1], line.rstrip()))
    return out


print(f"== server {base} (kit {a.kit}, commit {commit_of(a.kit)}), machine "
      f"{os.uname().nodename}, {os.cpu_count()} CPUs, load {open('/proc/loadavg').read().split()[:3]}",
      flush=True)


def bare_client():
    """(1) The bare client: its rate in MB/s (nan when it failed)."""
    bare = subprocess.run([sys.executable, os.path.join(a.kit, "bin", "ingest-bench.py"),
                           "--port", str(a.port), "-n", str(a.size_mb), "--size", str(1 << 20)],
                          capture_output=True, text=True)
    print(bare.stdout.strip(), bare.stderr.strip()[-500:], flush=True)
    m = re.search(r"= ([0-9.]+) MB/s", bare.stdout)
    return float(m.group(1)) if m else float("nan")


# (2) The agent.
work = tempfile.mkdtemp(prefix="tf-realserver-")
name = f"bench-rs-{label}-{os.getpid()}"
queue = f"{name}-q"
size = a.size_mb * 1_000_000
line = "x" * 99
config = f"""agent_id: {name}
server_address: {base}
job_queues: [{queue}]
polling_interval: 1
execution_basedir: {work}/run
logging_basedir: {work}/logs
results_basedir: {work}/results
setup_command: "true"
test_command: yes {line} | head -c {size}
allocate_command: "true"
reserve_command: "true"
cleanup_command: "true"
"""
cancel_config = config.replace(f"yes {line} | head -c {size}",
                               "echo started; sleep 20; echo never")
conf = os.path.join(work, "agent.yaml")
token = os.path.join(a.kit, "agentdirs", "refresh_token")
agent_log = open(os.path.join(work, "agent.stderr"), "w")


def start_agent(text):
    with open(conf, "w") as f:
        f.write(text)
    return subprocess.Popen([a.agent, "-c", conf, "--token-file", token],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=agent_log, start_new_session=True)


def wait_done(job_id, limit=600):
    deadline = time.time() + limit
    while time.time() < deadline:
        states = [l[5] for l in log_lines(job_id) if l[1] == "POST" and l[5].startswith("job_state=")]
        if states and states[-1] in ("job_state=complete", "job_state=cancelled"):
            return True
        time.sleep(0.2)
    return False


def stop(agent):
    agent.terminate()
    try:
        agent.wait(timeout=60)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()


def one_job():
    """One job through the running agent: (live MB/s, job MB/s, switch s, its job id)."""
    _, raw = api("POST", "/v1/job", {"job_queue": queue, "test_data": {"test_cmds": "x"}})
    job = json.loads(raw)["job_id"]
    if not wait_done(job):
        print(f"job {job}: not complete in time", flush=True)
        sys.exit(1)
    lines = log_lines(job)
    posts = [l for l in lines if l[1] == "POST" and l[5].startswith("job_state=")]
    test_post = next(l for l in posts if l[5] == "job_state=test")
    after = [l for l in posts if l[0] > test_post[0]]
    frags = [l for l in lines if "phase=test," in l[5]]
    test_bytes = sum(int(l[5].rsplit("len=", 1)[1]) for l in frags)
    last_end = max(l[0] + l[4] for l in frags)
    nxt = after[0]
    print(f"job {job}: {len(frags)} test fragments, {test_bytes} bytes; job_state posts "
          f"{[l[5].split('=')[1] for l in posts]}", flush=True)
    return (test_bytes / (last_end - test_post[0]) / 1e6,
            test_bytes / (nxt[0] - test_post[0]) / 1e6,
            nxt[0] - last_end, job)


bares, lives, jobs, switches = [], [], [], []
agent = start_agent(config)
try:
    for r in range(1, rounds + 1):
        bares.append(bare_client())
        live, job_rate, switch, job = one_job()
        lives.append(live)
        jobs.append(job_rate)
        switches.append(switch)
        print(f"round {r}: bare {bares[-1]:.1f} MB/s; live {live:.1f} MB/s "
              f"({live / bares[-1]:.3f}), job {job_rate:.1f} MB/s ({job_rate / bares[-1]:.3f}), "
              f"switch {switch * 1000:.1f} ms", flush=True)
finally:
    stop(agent)

if any(b != b for b in bares):
    print("the bare client failed in a round: no figures", flush=True)
    sys.exit(1)
bare_rate = max(bares)
figure("bare_client_mb_s", bare_rate, "MB/s")
figure("live_mb_s", max(lives), "MB/s")
figure("job_output_mb_s", max(jobs), "MB/s")
figure("job_vs_bare_ratio", max(jobs) / bare_rate, "ratio")
figure("live_vs_bare_ratio", max(lives) / bare_rate, "ratio")
figure("switch_ms", statistics.median_high(switches) * 1000, "ms")
pairs = sorted(l / b for l, b in zip(lives, bares))
print(f"median of the rounds' own live / bare ratios: {statistics.median_high(pairs):.3f} "
      f"(from {pairs[0]:.3f} to {pairs[-1]:.3f})", flush=True)
print("state reads and job_state posts of the last job (request log):", flush=True)
for l in log_lines(job):
    if l[1] == "GET" or l[5].startswith("job_state="):
        print("  " + l[6], flush=True)

if a.cancel:
    agent = start_agent(cancel_config)
    try:
        _, raw = api("POST", "/v1/job", {"job_queue": queue, "test_data": {"test_cmds": "x"}})
        job = json.loads(raw)["job_id"]
        deadline = time.time() + 120
        while time.time() < deadline and not any("phase=test," in l[5] for l in log_lines(job)):
            time.sleep(0.2)
        time.sleep(1)
        status, raw = api("POST", f"/v1/job/{job}/action", {"action": "cancel"})
        print(f"cancel job {job}: {status} {raw.decode().strip()}", flush=True)
        ok = wait_done(job, 120)
    finally:
        stop(agent)
    print(f"cancelled job {job}: {'ended' if ok else 'did NOT end'}; request log:", flush=True)
    for l in log_lines(job):
        if l[1] == "GET" or l[5].startswith("job_state=") or l[2].endswith("/action"):
            print("  " + l[6], flush=True)
    _, raw = api("GET", f"/v1/result/{job}")
    print(f"final job_state on the server: {json.loads(raw).get('job_state')}", flush=True)
