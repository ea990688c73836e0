#!/usr/bin/env python3
"""`run-job` figures for bench/all.sh, each beside its limit measured in the same run.

1. Throughput: a test phase printing SIZE bytes (`head -c SIZE /dev/zero`), run-job's
   stdout to /dev/null and its run directory on DIR (a tmpfs in bench/all.sh), against
   `sh -c 'CMD > DIR/file'`; alternating rounds, fastest of each, and their ratio. The
   agent's own CPU (utime + stime of all its threads, not the commands it reaps: read from
   /proc while it is a zombie, before it is reaped) per GB, and its peak RSS (VmHWM, read
   every 5 ms in one more round that is not timed: ru_maxrss would report this script's
   own RSS, inherited at the spawn).
2. Per-phase overhead: a job of seven phases that each run `true`, process start to exit
   divided by 7, beside `sh -c true` spawned and reaped from here.

Prints numbers; the lines that start with FIGURE are what bench/all.sh collects.
Usage: bench/run_job.py --bin PATH --dir DIR [--smoke] [--size BYTES] [--rounds N]
                        [--suffix _disk]   (the throughput figures only, names suffixed)
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


ACTIONS = [
    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
    (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
]


def measure(argv):
    """Runs argv (stdout and stdin on /dev/null). Returns (wall seconds, own CPU seconds,
    exit status)."""
    started = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=ACTIONS)
    # Wait for the exit without reaping: the zombie's stat still has its own times.
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    wall = time.perf_counter() - started
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    _, status = os.waitpid(pid, 0)
    return wall, cpu, os.waitstatus_to_exitcode(status)


def peak_rss_kib(argv):
    """Runs argv; returns the largest VmHWM read from /proc every 5 ms until it exits."""
    pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=ACTIONS)
    peak = 0
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.005)
    os.waitpid(pid, 0)
    return peak


# Appended to every figure's name (`--suffix`): the same figures from another directory.
SUFFIX = ""


def figure(name, value, unit, **details):
    extra = "".join(f" {k}={v}" for k, v in details.items())
    print(f"FIGURE {name}{SUFFIX}={value:.4f} unit={unit}{extra}", flush=True)


def fs_type(path):
    """The type of the file system `path` is on (`ext4`, `tmpfs`...): findmnt's, which
    names ext4 as such (stat -f says `ext2/ext3` for all three)."""
    for argv in (["findmnt", "-n", "-o", "FSTYPE", "--target", path],
                 ["stat", "-f", "-c", "%T", path]):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
        except OSError:
            continue
        if out.split():
            # The first line: a mount point mounted over twice is listed twice.
            return out.split()[0]
    return "unknown"


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def logged_bytes(run):
    """The size of test.log in the one run directory under `run`; removes `run`."""
    logged = sum(
        os.path.getsize(os.path.join(run, d, "test.log"))
        for d in os.listdir(run)
        if os.path.exists(os.path.join(run, d, "test.log"))
    )
    shutil.rmtree(run)
    return logged


def throughput(bin_path, base, work, size, rounds):
    cmd = f"head -c {size} /dev/zero"
    write(
        f"{work}/agent.yaml",
        f"""agent_id: bench
server_address: http://127.0.0.1:9
job_queues: [bench]
execution_basedir: {work}/run
logging_basedir: {work}/logs
results_basedir: {work}/results
logging_quiet: true
test_command: {cmd}
""",
    )
    write(f"{work}/job.yaml", "job_queue: bench\ntest_data: {test_cmds: x}\n")
    # A job with a secret: its output comes through the pipe and the masker.
    write(
        f"{work}/job-secret.yaml",
        "job_queue: bench\ntest_data: {test_cmds: x, secrets: {TOKEN: never-printed-s3cret}}\n",
    )
    agent = [bin_path, "run-job", "-c", f"{work}/agent.yaml", f"{work}/job.yaml"]
    masked = [bin_path, "run-job", "-c", f"{work}/agent.yaml", f"{work}/job-secret.yaml"]
    shell = ["/bin/sh", "-c", f"{cmd} > {work}/baseline.out"]
    print(f"== throughput: {size} bytes ({cmd}), {rounds} alternating rounds, on {work}")
    ours, theirs, cpus, piped, piped_cpus, bannered = [], [], [], [], [], []
    # The limit for the same file layout: the log starts with the phase banner, so the
    # command's writes start off a page boundary; `sh -c 'CMD >> file'` onto as many bytes.
    banner = 0
    appended = ["/bin/sh", "-c", f"{cmd} >> {work}/appended.out"]
    for r in range(1, rounds + 1):
        base_s, _, base_rc = measure(shell)
        os.remove(f"{work}/baseline.out")
        agent_s, agent_cpu, agent_rc = measure(agent)
        logged = logged_bytes(f"{work}/run")
        masked_s, masked_cpu, masked_rc = measure(masked)
        masked_logged = logged_bytes(f"{work}/run")
        banner = banner or max(logged - size, 0)
        write(f"{work}/appended.out", "x" * banner)
        appended_s, _, appended_rc = measure(appended)
        os.remove(f"{work}/appended.out")
        print(
            f"round {r}: sh -c CMD>file {base_s:.3f} s; run-job {agent_s:.3f} s "
            f"(ratio {agent_s / base_s:.3f}), agent CPU {agent_cpu:.2f} s, "
            f"test.log {logged} bytes, exit {agent_rc}; with a secret (pipe + masking) "
            f"{masked_s:.3f} s (ratio {masked_s / base_s:.3f}), agent CPU {masked_cpu:.2f} s, "
            f"test.log {masked_logged} bytes, exit {masked_rc}",
            flush=True,
        )
        # test.log holds the phase banner, then the output byte for byte.
        whole = all(size <= n <= size + 4096 for n in (logged, masked_logged))
        if base_rc != 0 or agent_rc != 0 or masked_rc != 0 or appended_rc != 0 or not whole:
            print(f"round {r} failed: no run-job throughput figures", file=sys.stderr)
            return
        ours.append(agent_s)
        theirs.append(base_s)
        cpus.append(agent_cpu)
        piped.append(masked_s)
        piped_cpus.append(masked_cpu)
        bannered.append(appended_s)
    rss = peak_rss_kib(agent)
    logged_bytes(f"{work}/run")
    print(f"peak RSS (VmHWM every 5 ms, one more round): {rss} KiB")
    details = {"bytes": size, "rounds": rounds, "dir": base, "fs": fs_type(base)}
    figure("run_job_s", min(ours), "s", **details)
    figure("sh_to_file_s", min(theirs), "s", **details)
    figure("run_job_vs_sh_ratio", min(ours) / min(theirs), "ratio", **details)
    figure("run_job_cpu_s_per_gb", min(cpus) / (size / 1e9), "s/GB", **details)
    figure("sh_after_banner_s", min(bannered), "s", banner_bytes=banner, **details)
    figure("run_job_vs_sh_after_banner_ratio", min(ours) / min(bannered), "ratio", **details)
    figure("run_job_masked_s", min(piped), "s", **details)
    figure("run_job_masked_vs_sh_ratio", min(piped) / min(theirs), "ratio", **details)
    figure("run_job_masked_cpu_s_per_gb", min(piped_cpus) / (size / 1e9), "s/GB", **details)
    figure("run_job_peak_rss_mib", rss / 1024, "MiB", **details)


PHASES = ["setup", "provision", "firmware_update", "test", "allocate", "reserve", "cleanup"]


def overhead(bin_path, work, runs):
    commands = "".join(f'{p}_command: "true"\n' for p in PHASES)
    write(
        f"{work}/agent7.yaml",
        f"""agent_id: bench
server_address: http://127.0.0.1:9
job_queues: [bench]
execution_basedir: {work}/run7
logging_basedir: {work}/logs
results_basedir: {work}/results
logging_quiet: true
{commands}""",
    )
    write(
        f"{work}/job7.yaml",
        """job_queue: bench
provision_data: {url: x}
firmware_update_data: {version: x}
test_data: {test_cmds: x}
allocate_data: {allocate: true}
reserve_data: {timeout: 1}
""",
    )
    agent = [bin_path, "run-job", "-c", f"{work}/agent7.yaml", f"{work}/job7.yaml"]
    print(f"== per-phase overhead: 7 phases running true, {runs} jobs")
    jobs = []
    for _ in range(runs):
        wall, _, rc = measure(agent)
        if rc != 0:
            print(f"the 7-phase job exited {rc}: no overhead figures", file=sys.stderr)
            return
        jobs.append(wall)
        shutil.rmtree(f"{work}/run7")
    shells = [measure(["/bin/sh", "-c", "true"])[0] for _ in range(runs * 7)]
    # The summary's durations (spawn to reap) of one more job.
    out = subprocess.run(agent, capture_output=True, text=True, check=False).stdout
    ran = [float(line.split()[3].rstrip("s")) for line in out.splitlines()
           if len(line.split()) >= 5 and line.split()[1] == "ran"]
    shutil.rmtree(f"{work}/run7", ignore_errors=True)
    per_phase = sum(jobs) / len(jobs) / 7 * 1000
    sh_true = sum(shells) / len(shells) * 1000
    print(
        f"whole job (process start to exit) {sum(jobs) / len(jobs) * 1000:.2f} ms: "
        f"{per_phase:.2f} ms a phase; `sh -c true` from here {sh_true:.2f} ms; "
        f"the summary's phase durations (spawn to reap): mean "
        f"{sum(ran) / max(len(ran), 1) * 1000:.2f} ms over {len(ran)} phases"
    )
    figure("phase_overhead_ms", per_phase, "ms", jobs=runs)
    figure("sh_true_ms", sh_true, "ms", runs=len(shells))
    if len(ran) == 7:
        figure("phase_spawn_to_reap_ms", sum(ran) / 7 * 1000, "ms", phases=7)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", required=True, help="the testflinger-agent binary")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the runs write")
    parser.add_argument("--smoke", action="store_true", help="small size, one round")
    parser.add_argument("--size", type=int, help="bytes the test phase prints")
    parser.add_argument("--rounds", type=int, help="alternating rounds")
    parser.add_argument("--suffix", default="",
                        help="appended to the figures' names (e.g. _disk); measures only "
                        "the throughput figures")
    args = parser.parse_args()
    global SUFFIX
    SUFFIX = args.suffix
    size = args.size or (100_000_000 if args.smoke else 1_000_000_000)
    rounds = args.rounds or (1 if args.smoke else 5)
    work = tempfile.mkdtemp(prefix="bench-run-job-", dir=args.dir)
    try:
        throughput(os.path.abspath(args.bin), args.dir, work, size, rounds)
        if not args.suffix:
            overhead(os.path.abspath(args.bin), work, 3 if args.smoke else 20)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
