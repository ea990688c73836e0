#!/usr/bin/env python3
"""The collector of bench/all.sh: reads the `FIGURE name=value unit=U key=value...` lines
its producers printed, checks each against the table below (every figure present, once,
in its unit, a finite number), puts each beside its limit or target (issue 10,
"Performance to aim for"), prints a table and writes the JSON that bench/README.md's
performance table is rendered from (tests/it/docs.rs). Exits 1 when a figure is missing,
unknown, repeated or malformed, or a producer failed.

Usage: bench/collect.py --log FILE --json FILE --mode full|smoke --build PROFILE
                        [--tmpfs TEXT] [--load "1 5 15"] [--note TEXT]
                        [--failed "NAME..."]
"""

import argparse
import datetime
import json
import math
import os
import platform
import sys

RUN_JOB = "bench/run_job.py"
PROCESS = "cargo bench --bench process"
DAEMON = "cargo bench --bench suite -- daemon"
IDLE = "cargo bench --bench suite -- idle"
FLEET = "cargo bench --bench suite -- fleet"

# (name, unit, what it is, limit as (op, value) or None, the target's words, producer).
# `{key}` in the words is filled from the figure's details (`{bytes}` as MB or GB).
RUN_JOB_THROUGHPUT = [
    ("run_job_s", "s",
     "`run-job`, a test printing {bytes} (`head -c`), run directory on tmpfs, stdout to "
     "/dev/null: wall time, fastest of {rounds} rounds", None, "", RUN_JOB),
    ("sh_to_file_s", "s",
     "the limit: `sh -c 'CMD > file'` on the same tmpfs, fastest of {rounds} rounds "
     "alternating with `run-job`'s", None, "", RUN_JOB),
    ("run_job_vs_sh_ratio", "ratio",
     "`run-job` / `sh -c 'CMD > file'` (no secrets: the command writes the log itself, "
     "as in the daemon; `run-job` copies nothing to a standard output on /dev/null)",
     ("<=", 1.10), "≤ 1.10×", RUN_JOB),
    ("run_job_cpu_s_per_gb", "s/GB",
     "agent CPU per GB in that job (its utime + stime, not the command's)",
     ("<=", 1.0), "≤ 1 s/GB", RUN_JOB),
    ("run_job_peak_rss_mib", "MiB", "agent peak RSS (VmHWM) in that job",
     ("<=", 16.0), "≤ 16 MiB", RUN_JOB),
    ("sh_after_banner_s", "s",
     "the limit for the same file: `sh -c 'CMD >> file'` onto a file holding as many bytes "
     "as the phase banner ({banner_bytes}), so that its writes start off a page boundary as "
     "the command's do in `<phase>.log`; fastest of {rounds} rounds", None, "", RUN_JOB),
    ("run_job_vs_sh_after_banner_ratio", "ratio",
     "`run-job` / that limit", None, "", RUN_JOB),
    ("run_job_masked_s", "s",
     "the same job with a secret to mask (output through the pipe and the masker): wall "
     "time, fastest of {rounds} rounds alternating with the two above", None, "", RUN_JOB),
    ("run_job_masked_vs_sh_ratio", "ratio",
     "`run-job` with a secret / `sh -c 'CMD > file'`", ("<=", 1.30), "≤ 1.30×", RUN_JOB),
    ("run_job_masked_cpu_s_per_gb", "s/GB",
     "agent CPU per GB with a secret (reading the pipe, masking, writing the log)",
     ("<=", 1.0), "≤ 1 s/GB", RUN_JOB),
]
# The same figures with the run directory on the disk `/tmp` is on (issue 16: tmpfs and disk).
RUN_JOB_THROUGHPUT_DISK = [
    (name + "_disk", unit,
     "[{fs}, the disk /tmp is on] "
     + what.replace("on tmpfs", "on the disk").replace("the same tmpfs", "the same disk"),
     limit, target, producer + " --suffix _disk")
    for name, unit, what, limit, target, producer in RUN_JOB_THROUGHPUT
]
FIGURES = RUN_JOB_THROUGHPUT + RUN_JOB_THROUGHPUT_DISK + [
    ("phase_overhead_ms", "ms",
     "overhead per phase: a job of 7 phases running `true`, process start to exit / 7, "
     "mean of {jobs} jobs", None, "", RUN_JOB),
    ("sh_true_ms", "ms", "the limit: `sh -c true` spawned and reaped", None, "", RUN_JOB),
    ("phase_spawn_to_reap_ms", "ms",
     "a phase of `true` in `run-job`'s summary (spawn to last reap)", None, "", RUN_JOB),
    ("daemon_output_mb_s", "MB/s",
     "daemon, a test printing {bytes}, all of it on the fake server: agent start to job "
     "complete, fastest of {rounds}", (">=", 150.0), "≥ 150 MB/s", DAEMON),
    ("bare_poster_mb_s", "MB/s",
     "the limit: a bare poster (ureq, 1 MiB fragments one after the other) into the same "
     "fake server, fastest of {rounds} alternating", None, "", DAEMON),
    ("daemon_vs_bare_ratio", "ratio", "daemon / bare poster",
     (">=", 0.50), "≥ 0.50× (half the bare poster's rate)", DAEMON),
    ("daemon_cpu_s_per_gb", "s/GB", "agent CPU per GB in the daemon's job",
     ("<=", 1.0), "≤ 1 s/GB", DAEMON),
    ("daemon_job_peak_rss_mib", "MiB", "agent peak RSS (VmHWM) in the daemon's job",
     ("<=", 16.0), "≤ 16 MiB", DAEMON),
    ("deadline_sigterm_p50_ms", "ms",
     "deadline → SIGTERM of the group (one process), p50 of {runs}", None, "", PROCESS),
]
SHAPES = [
    ("single", "one process"),
    ("tree", "a tree of 5 honouring SIGTERM"),
    ("sigkill_tree", "a tree ignoring SIGTERM (SIGKILL after a {grace_ms} ms grace period)"),
    ("escapee", "a tree whose `setsid` escapee holds the output"),
]
for _trigger, _words in [("deadline", "deadline"), ("cancel", "cancel request")]:
    for _shape, _what in SHAPES:
        for _p in ["p50", "p99"]:
            FIGURES.append((
                f"{_trigger}_dead_{_shape}_{_p}_ms", "ms",
                f"{_words} → every process dead, {_what}: {_p} of {{runs}}",
                None, "", PROCESS))
FIGURES += [
    ("tree_survivors", "processes",
     "processes of those trees alive after the runner returned ({runs} runs of each "
     "shape and trigger)", ("==", 0.0), "0", PROCESS),
    ("idle_cpu_s_per_min", "s/min",
     "idle daemon (polling every {poll_s} s): CPU over {window_s} s ({method})",
     ("<=", 0.01), "≤ 0.01 s/min", IDLE),
    ("idle_rss_mib", "MiB", "idle daemon: RSS (VmRSS)", ("<=", 6.0), "≤ 6 MiB", IDLE),
    ("idle_peak_rss_mib", "MiB", "idle daemon: peak RSS (VmHWM)",
     ("<=", 6.0), "≤ 6 MiB", IDLE),
    ("idle_requests_per_min", "requests/min", "idle daemon: requests a minute",
     None, "", IDLE),
    ("idle_requests_per_cycle", "requests", "idle daemon: requests per polling cycle",
     ("<=", 2.0), "≤ 2", IDLE),
    ("silent_phase_requests_per_s", "requests/s",
     "a test phase printing nothing, access tokens expiring every {token_ttl_s} s: "
     "requests a second over {window_s} s", ("<=", 0.1), "≤ 0.1 requests/s", IDLE),
    ("fleet_idle_rss_mib", "MiB", "{agents} idle agents, one fake server: total RSS",
     ("<=", 800.0), "≤ 800 MiB (100 agents)", FLEET),
    ("fleet_idle_cpu_s_per_min", "s/min",
     "{agents} idle agents (polling every {poll_s} s): total CPU over {window_s} s "
     "({method})", None, "", FLEET),
    ("fleet_idle_requests_per_s", "requests/s", "{agents} idle agents: requests a second",
     None, "", FLEET),
    ("fleet_job_peak_rss_mib", "MiB",
     "{agents} agents, one short job each: total peak RSS (VmHWM)",
     ("<=", 800.0), "≤ 800 MiB (100 agents)", FLEET),
    ("fleet_job_cpu_s", "s",
     "{agents} agents, one short job each: total CPU of the agents and their commands, "
     "jobs submitted → all complete ({method})",
     None, "", FLEET),
    ("fleet_job_requests_per_s", "requests/s",
     "{agents} agents, one short job each: requests a second meanwhile", None, "", FLEET),
    ("fleet_jobs_done_s", "s",
     "{agents} agents, one short job each: jobs submitted → all complete", None, "", FLEET),
]

REALSERVER = "bench/realserver.py (TF_BENCH_SERVER)"
# Against the real-server kit, only when bench/all.sh is given one (TF_BENCH_SERVER): `old`
# is a server without `GET /v1/result/<id>/status`, `status` one with it (upstream PR #1285).
OPTIONAL = []
for _kind, _words in [("old", "a server without `/status`"),
                      ("status", "a server with `/status`")]:
    OPTIONAL += [
        (f"realserver_{_kind}_bare_client_mb_s", "MB/s",
         f"the limit: the kit's `ingest-bench.py`, 1 MiB fragments on one connection, into "
         f"{_words} ({{server}}, commit {{commit}}, on {{host}}), best of {{rounds}} rounds "
         f"alternating with the agent's", None, "", REALSERVER),
        (f"realserver_{_kind}_live_mb_s", "MB/s",
         f"daemon, a test phase printing {{bytes}} into {_words} ({{server}} on {{host}}): the live "
         f"rate (the `test` state post to the end of its last fragment, from the server's request "
         f"log), best of {{rounds}} rounds", None, "", REALSERVER),
        (f"realserver_{_kind}_live_vs_bare_ratio", "ratio",
         f"that live rate / the bare client's, {_words} ({{server}} on {{host}}, same run)", (">=", 0.80), "≥ 0.80×", REALSERVER),
        (f"realserver_{_kind}_job_output_mb_s", "MB/s",
         f"the job's output rate into {_words} ({{server}} on {{host}}): {{bytes}} / (the `test` "
         f"state post → the next state post), best of {{rounds}} rounds", None, "", REALSERVER),
        (f"realserver_{_kind}_job_vs_bare_ratio", "ratio",
         f"that job output rate / the bare client's, {_words} ({{server}} on {{host}}, same run)", (">=", 0.75), "≥ 0.75×",
         REALSERVER),
        (f"realserver_{_kind}_switch_ms", "ms",
         f"the end of the test phase's last fragment → the next state post, {_words} "
         f"({{server}} on {{host}}), median of {{rounds}} rounds",
         ("<=", 50.0), "≤ 50 ms", REALSERVER),
    ]


def parse_line(line):
    """(name, value, unit, details) of a FIGURE line; raises ValueError when malformed."""
    words = line.split()
    if len(words) < 3 or words[0] != "FIGURE" or "=" not in words[1]:
        raise ValueError("expected `FIGURE name=value unit=U ...`")
    name, value = words[1].split("=", 1)
    pairs = {}
    for word in words[2:]:
        if "=" not in word:
            raise ValueError(f"`{word}` is not key=value")
        key, val = word.split("=", 1)
        pairs[key] = val
    if "unit" not in pairs:
        raise ValueError("no unit=")
    unit = pairs.pop("unit")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value} is not a finite number")
    return name, number, unit, pairs


def size_words(nbytes):
    n = int(nbytes)
    if n >= 1_000_000_000 and n % 1_000_000_000 == 0:
        return f"{n // 1_000_000_000} GB"
    return f"{n / 1_000_000:g} MB"


def words(template, details):
    filled = dict(details)
    if "bytes" in filled:
        filled["bytes"] = size_words(filled["bytes"])
    try:
        return template.format(**filled)
    except KeyError as missing:
        raise ValueError(f"its details lack {missing} for its description") from None


def met(limit, value):
    if limit is None:
        return None
    op, bound = limit
    return {"<=": value <= bound, ">=": value >= bound, "==": value == bound}[op]


def shown(value, unit):
    """The value as the tables show it (tests/it/docs.rs renders the same way)."""
    size = abs(value)
    if value == int(value) and unit in ("processes", "requests"):
        text = f"{int(value)}"
    elif size >= 100:
        text = f"{value:.0f}"
    elif size >= 10:
        text = f"{value:.1f}"
    elif size >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text}×" if unit == "ratio" else f"{text} {unit}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--mode", choices=["full", "smoke"], required=True)
    parser.add_argument("--build", required=True)
    parser.add_argument("--tmpfs", default="")
    parser.add_argument("--load", default="", help="/proc/loadavg before measuring")
    parser.add_argument("--note", default="")
    parser.add_argument("--failed", default="", help="producers that exited non-zero")
    args = parser.parse_args()

    known = {f[0]: f for f in FIGURES + OPTIONAL}
    seen = {}
    problems = []
    with open(args.log, errors="replace") as log:
        for number, line in enumerate(log, 1):
            if not line.startswith("FIGURE "):
                continue
            try:
                name, value, unit, details = parse_line(line)
            except ValueError as err:
                problems.append(f"line {number}: {err}: {line.strip()}")
                continue
            if name not in known:
                problems.append(f"line {number}: unknown figure {name} (not in bench/collect.py)")
            elif name in seen:
                problems.append(f"line {number}: {name} printed twice")
            elif unit != known[name][1]:
                problems.append(f"line {number}: {name} in {unit}, expected {known[name][1]}")
            else:
                seen[name] = (value, details)

    figures = []
    missing = []
    for name, unit, what, limit, target, source in FIGURES + OPTIONAL:
        if name not in seen:
            if (name, unit, what, limit, target, source) not in OPTIONAL:
                missing.append(name)
            continue
        value, details = seen[name]
        try:
            label = words(what, details)
        except ValueError as err:
            problems.append(f"{name}: {err}")
            continue
        figures.append({
            "name": name,
            "label": label,
            "value": value,
            "unit": unit,
            "limit": None if limit is None else {"op": limit[0], "value": limit[1]},
            "target": target,
            "met": met(limit, value),
            "source": source,
            "details": details,
        })
    failed = args.failed.split()
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    result = {
        "suite": "bench/all.sh",
        "mode": args.mode,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "build": args.build,
        "host": {"cores": os.cpu_count(), "kernel": platform.release(), "cpu": cpu_model,
                 "load_before": args.load},
        "tmpfs": args.tmpfs,
        "note": args.note,
        "figures": figures,
        "missing": missing,
        "problems": problems,
        "failed_producers": failed,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as out:
        json.dump(result, out, indent=2, ensure_ascii=False)
        out.write("\n")

    rows = [("figure", "value", "limit/target", "met?")]
    for f in figures:
        rows.append((f["name"], shown(f["value"], f["unit"]), f["target"] or "—",
                     {True: "yes", False: "NO", None: "—"}[f["met"]]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"\n== bench/all.sh ({args.mode}, {args.build} build; tmpfs: {args.tmpfs})")
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    not_met = [f["name"] for f in figures if f["met"] is False]
    optional = sum(1 for f in figures if f["name"] not in {row[0] for row in FIGURES})
    print(f"\n{len(figures) - optional} of {len(FIGURES)} figures, {optional} against the real"
          f" servers; {len(not_met)} not at their target"
          f"{': ' + ', '.join(not_met) if not_met else ''}; JSON: {args.json}")
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    if missing:
        print(f"missing figures: {', '.join(missing)}", file=sys.stderr)
    if failed:
        print(f"producers that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if missing or problems or failed else 0


if __name__ == "__main__":
    sys.exit(main())
