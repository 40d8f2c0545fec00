"""Soak test: mixed load, 20 every-second cron rules and task workers killed at random.

    python perf/soak.py --minutes 10          # the long run (perf/results/soak.jsonl)
    python perf/soak.py --seconds 60          # the CI version (tests/test_soak.py)

One server (2 workers + 2 task workers, cron=True, a message queue key derived from this
script's pid, one user process) under a moderate mixed load:

- each worker, on a 20 ms timer, delivers 1 CO and 5 ASYNC tasks;
- the user process delivers with Task.deliver_by_process: 1 ASYNC every 10 ms, 1 CO every 50 ms;
- a separate command process (started by this script, not by the server) delivers through the
  message queue: 2 ASYNC every 10 ms, 1 CO every 50 ms;
- 20 ``@scheduled(cron="* * * * * *")`` methods.

Every ``--kill-every`` seconds a random task worker is SIGKILLed.

Accounting that cannot lie: every task carries (source, seq). The task workers count each
execution per (source, seq) in a SysV shared-memory segment this script creates (one array per
task worker index, so no two processes ever write the same byte), and mark each start from a
BEFORE_TASK listener. The senders write each delivery's outcome into the same segment:
delivered, result ok, TaskWorkerLost, TaskTimeout, other error, not sent. Each cron method
counts its executions per (job, due second) and writes how late it ran.

Rules (the exit status is 0 only if all hold):

- no (source, seq) ran twice, on any path (queue included), and no cron run ran twice;
- on every path (worker CO/ASYNC, user process CO/ASYNC, the command's CO/ASYNC through the
  message queue) every delivered task that never ran was reported lost (never_ran_unexplained
  == 0): to its sender as TaskWorkerLost, or, for the command's ASYNC tasks, which have no
  reply channel, by the master's log line naming its task id (the command records the id of
  each delivery in the segment);
- cron: every (job, due second) of the window (from 3 s after the server was up to 2 s before
  it was stopped) ran, except a run that a task worker had started (BEFORE_TASK seen) and that
  never finished counting because that task worker was killed: that one is counted as
  ``lost_with_killed_task_worker`` (reported), not as missed. Late runs (more than 1 s after
  their due second) are counted, not failed;
- RSS per process role (master, worker N, task worker N, each user process) does not grow by
  more than 20 MiB and 25% between the first sample after a 30 s warm-up and the last one
  (task workers are respawned: the role is compared, whichever process holds it).

At the end the master gets SIGTERM; the script checks that the whole process group is gone and that
no SysV queue or segment of this run is left. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _procs import cpu_ticks as _cpu_ticks  # noqa: E402
from _procs import group_procs as _group_procs  # noqa: E402

SOURCES = ["worker0.co", "worker0.async", "worker1.co", "worker1.async",
           "process.co", "process.async", "queue.co", "queue.async"]
# Deliveries per second per source (the timers above); capacities are sized from them.
RATES = [50, 250, 50, 250, 20, 100, 20, 200]
N_CRON = 20
N_TW = 2
CTL = 64                 # int64 control words: [0] stop, [1 + src] next seq of src
WARMUP = 30.0
SAMPLE_EVERY = 10.0
# Outcomes written by the senders
DELIVERED, OK, LOST, TIMEOUT, ERROR, NOT_SENT, WRONG = 1, 2, 3, 4, 5, 6, 7

# What both scripts share: the layout in shared memory and the seq counters of the sources.
SHARED = textwrap.dedent('''
    import json, os, sys, time
    import sysv_ipc

    L = json.loads(os.environ["SOAK_LAYOUT"])
    SHM = sysv_ipc.SharedMemory(L["shm_key"])
    MEM = memoryview(SHM)
    CTL = MEM[:L["ctl_bytes"]].cast("q")
    OUT = MEM[L["out_off"]:L["out_off"] + L["slots"]]
    QIDS = MEM[L["qids_off"]:L["qids_off"] + 8 * L["cap"][7]].cast("q")
    BASE, CAP = L["base"], L["cap"]

    def next_seq(src):
        """The next seq of src, or None once stopped or at capacity."""
        seq = CTL[1 + src]
        if CTL[0] or seq >= CAP[src]:
            return None
        CTL[1 + src] = seq + 1
        OUT[BASE[src] + seq] = 1
        return seq

''')

SERVER = SHARED + textwrap.dedent('''
    from pyswtask import (Event, Server, Task, TaskError, TaskTimeout, TaskWorkerLost, listener,
                          scheduled, task)
    from pyswtask.cron import CRON_TASK, due_second

    DELAY = MEM[L["delay_off"]:L["delay_off"] + L["delay_bytes"]].cast("i")
    COUNTS = MEM[L["counts_off"]:L["counts_off"] + L["n_tw"] * L["slots"]]
    STARTED = MEM[L["started_off"]:L["started_off"] + L["n_tw"] * L["slots"]]
    CRON = L["n_cron"] * L["nsec"]
    CRON_COUNTS = MEM[L["cron_counts_off"]:L["cron_counts_off"] + L["n_tw"] * CRON]
    CRON_STARTED = MEM[L["cron_started_off"]:L["cron_started_off"] + L["n_tw"] * CRON]
    S, NSEC, BASE_SEC = L["slots"], L["nsec"], L["base_sec"]
    WORK = L["work"]
    state = {"tw": 0, "server": None}

    @task("soak")
    class Soak:
        def hit(self, src, seq):
            COUNTS[state["tw"] * S + BASE[src] + seq] += 1
            sum(range(WORK))
            return seq

    def make(i):
        @scheduled(cron="* * * * * *")
        def rule(self):
            sec = due_second.get()
            k = sec - BASE_SEC
            if 0 <= k < NSEC:
                CRON_COUNTS[state["tw"] * CRON + i * NSEC + k] += 1
                DELAY[i * NSEC + k] = max(DELAY[i * NSEC + k], int((time.time() - sec) * 1000))
        rule.__name__ = rule.__qualname__ = f"rule{i}"
        return rule

    task("soakcron")(type("SoakCron", (), {f"rule{i}": make(i) for i in range(L["n_cron"])}))

    @listener(Event.BEFORE_TASK)
    def before(event):
        name, method, params, task_id = event.params
        if name == "soak":
            src, seq = params
            STARTED[state["tw"] * S + BASE[src] + seq] += 1
        elif name == CRON_TASK:
            row, job, sec = params
            spec = state["server"].crontab.jobs[job]
            k = sec - BASE_SEC
            if spec.task == "soakcron" and 0 <= k < NSEC:
                CRON_STARTED[state["tw"] * CRON + int(spec.method[4:]) * NSEC + k] += 1

    def outcome(src, seq, result):
        if isinstance(result, TaskWorkerLost):
            code = 3
        elif isinstance(result, TaskTimeout):
            code = 4
        elif isinstance(result, BaseException):
            code = 5
        else:
            code = 2 if result == seq else 7
        OUT[BASE[src] + seq] = code

    def on_task_worker_start(server, wid):
        state["tw"], state["server"] = wid - server.worker_num, server

    def on_worker_start(server, wid):
        co, asy = 2 * wid, 2 * wid + 1

        def tick(timer_id):
            for _ in range(5):
                seq = next_seq(asy)
                if seq is None:
                    break
                Task.deliver("soak", "hit", [asy, seq], Task.TYPE_ASYNC,
                             callback=lambda tid, r, s=seq: outcome(asy, s, r))
            seq = next_seq(co)
            if seq is not None:
                try:
                    r = Task.deliver("soak", "hit", [co, seq], timeout=5.0)
                except Exception as exc:
                    r = exc
                outcome(co, seq, r)

        server.tick(20, tick)

    def user_process(server, proc):
        co, asy = 4, 5
        n = 0
        while True:
            if CTL[0]:
                proc.sleep(0.2)
                continue
            seq = next_seq(asy)
            if seq is not None:
                try:
                    Task.deliver_by_process("soak", "hit", [asy, seq], worker_id=-1,
                                            callback=lambda rid, r, s=seq: outcome(asy, s, r))
                except Exception:
                    OUT[BASE[asy] + seq] = 6
            n += 1
            if n % 5 == 0 and (seq := next_seq(co)) is not None:
                try:
                    r = Task.deliver_by_process("soak", "hit", [co, seq], timeout=5.0,
                                                worker_id=-1, type=Task.TYPE_CO)
                except Exception as exc:
                    r = exc
                outcome(co, seq, r)
            proc.sleep(0.01)

    server = Server(worker_num=2, task_worker_num=L["n_tw"], cron=True,
                    message_queue_key=L["queue_key"], cron_shm_key=L["cron_key"])
    server.on("worker_start", on_worker_start)
    server.on("task_worker_start", on_task_worker_start)
    server.add_process(user_process, name="soakproc")
    sys.exit(server.start())
''')

COMMAND = SHARED + textwrap.dedent('''
    from pyswtask import QueueFull, Task, TaskTimeout, TaskWorkerLost
    co, asy = 6, 7

    Task.configure(message_queue_key=L["queue_key"])
    n = 0
    while not CTL[0]:
        for _ in range(2):
            seq = next_seq(asy)
            if seq is not None:
                try:
                    QIDS[seq] = Task.deliver("soak", "hit", [asy, seq], Task.TYPE_ASYNC,
                                             timeout=5.0)
                except Exception:
                    OUT[BASE[asy] + seq] = 6
        n += 1
        if n % 5 == 0 and (seq := next_seq(co)) is not None:
            try:
                r = Task.deliver("soak", "hit", [co, seq], timeout=5.0)
                OUT[BASE[co] + seq] = 2 if r == seq else 7
            except TaskWorkerLost:
                OUT[BASE[co] + seq] = 3
            except TaskTimeout:
                OUT[BASE[co] + seq] = 4
            except QueueFull:
                OUT[BASE[co] + seq] = 6
            except Exception:
                OUT[BASE[co] + seq] = 5
        time.sleep(0.01)
    Task.flush(30)
''')


def _status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _role(title: str) -> str | None:
    if title.startswith("pyswtask: "):
        return title[len("pyswtask: "):]
    return None


def _sysv_ids(kind: str) -> dict[int, tuple[int, int]]:
    """id -> (key, creator pid or -1) from ipcs (-m: segments, -q: queues)."""
    rows: dict[int, tuple[int, int]] = {}
    plain = subprocess.run(["ipcs", kind], capture_output=True, text=True).stdout
    for line in plain.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[0].startswith("0x") and parts[1].isdigit():
            rows[int(parts[1])] = (int(parts[0], 16), -1)
    if kind == "-m":
        pids = subprocess.run(["ipcs", "-m", "-p"], capture_output=True, text=True).stdout
        for line in pids.splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[0].isdigit() and int(parts[0]) in rows:
                rows[int(parts[0])] = (rows[int(parts[0])][0], int(parts[2]))
    return rows


def layout(seconds: float, base_sec: int, shm_key: int, queue_key: int, cron_key: int,
           work: int) -> dict[str, Any]:
    cap = [int(r * seconds * 1.3) + 2000 for r in RATES]
    base = [sum(cap[:i]) for i in range(len(cap))]
    slots = sum(cap)
    nsec = int(seconds) + 300
    ctl_bytes = CTL * 8
    delay_off = ctl_bytes
    delay_bytes = 4 * N_CRON * nsec
    out_off = delay_off + delay_bytes
    counts_off = out_off + slots
    started_off = counts_off + N_TW * slots
    cron_counts_off = started_off + N_TW * slots
    cron_started_off = cron_counts_off + N_TW * N_CRON * nsec
    qids_off = (cron_started_off + N_TW * N_CRON * nsec + 7) // 8 * 8
    size = qids_off + 8 * cap[SOURCES.index("queue.async")]
    return {"shm_key": shm_key, "queue_key": queue_key, "cron_key": cron_key, "cap": cap,
            "base": base, "slots": slots, "nsec": nsec, "base_sec": base_sec, "n_tw": N_TW,
            "n_cron": N_CRON, "ctl_bytes": ctl_bytes, "delay_off": delay_off,
            "delay_bytes": delay_bytes, "out_off": out_off, "counts_off": counts_off,
            "started_off": started_off, "cron_counts_off": cron_counts_off,
            "cron_started_off": cron_started_off, "qids_off": qids_off, "size": size,
            "work": work}


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


# The master's line for a command's ASYNC task lost with its task worker (it has no reply).
LOGGED_LOST = re.compile(r"ASYNC task (\d+) of command pid \d+ lost: ")


def analyse(mem: memoryview, L: dict[str, Any], window: tuple[int, int], kills: int,
            logged_lost: set[int]) -> tuple[list[dict[str, Any]], list[str]]:
    import numpy as np

    buf = np.frombuffer(mem, dtype=np.uint8)
    ctl = np.frombuffer(mem[:L["ctl_bytes"]], dtype=np.int64)
    slots, nsec = L["slots"], L["nsec"]
    out = buf[L["out_off"]:L["out_off"] + slots]
    def per_task_worker(off: int) -> Any:
        return buf[off:off + N_TW * slots].reshape(N_TW, slots).sum(0, dtype=np.int64)

    counts, started = per_task_worker(L["counts_off"]), per_task_worker(L["started_off"])
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for src, name in enumerate(SOURCES):
        n = int(ctl[1 + src])
        lo = L["base"][src]
        o, c, s = out[lo:lo + n], counts[lo:lo + n], started[lo:lo + n]
        sent = o != NOT_SENT
        never = sent & (c == 0)
        reported = o == LOST
        if name == "queue.async":
            qids = np.frombuffer(mem[L["qids_off"]:L["qids_off"] + 8 * n], dtype=np.int64)
            reported = np.isin(qids, np.array(sorted(logged_lost), dtype=np.int64))
        row = {"source": name, "delivered": int(sent.sum()), "not_sent": int((~sent).sum()),
               "ran_once": int((c == 1).sum()), "ran_twice_or_more": int((c >= 2).sum()),
               "never_ran": int(never.sum()),
               "never_ran_reported_lost": int((never & reported).sum()),
               "never_ran_timeout": int((never & (o == TIMEOUT)).sum()),
               "never_ran_started": int((never & (s > 0)).sum()),
               "ran_reported_lost": int(((c > 0) & (o == LOST)).sum()),
               "timeouts": int((o == TIMEOUT).sum()), "errors": int((o == ERROR).sum()),
               "wrong_result": int((o == WRONG).sum()),
               "capacity_reached": n >= L["cap"][src]}
        if not name.endswith("queue.async"):
            row["no_result"] = int((sent & (o == DELIVERED)).sum())
        row["never_ran_unexplained"] = int((never & ~reported).sum())
        if name == "queue.async":
            row["note"] = ("a command's ASYNC task has no reply: reported lost = named by the "
                           "master's log")
        rows.append(row)
        if row["ran_twice_or_more"]:
            failures.append(f"{name}: {row['ran_twice_or_more']} duplicated")
        if row["wrong_result"]:
            failures.append(f"{name}: {row['wrong_result']} wrong results")
        if row["never_ran_unexplained"]:
            failures.append(f"{name}: {row['never_ran_unexplained']} lost without being "
                            "reported")
        if row.get("no_result"):
            failures.append(f"{name}: {row['no_result']} deliveries never got a result")
        if row["errors"]:
            failures.append(f"{name}: {row['errors']} errors")
    cron = N_CRON * nsec
    cc = buf[L["cron_counts_off"]:L["cron_counts_off"] + N_TW * cron].reshape(N_TW, N_CRON, nsec).sum(
        0, dtype=np.int64)
    cs = buf[L["cron_started_off"]:L["cron_started_off"] + N_TW * cron].reshape(N_TW, N_CRON, nsec).sum(
        0, dtype=np.int64)
    delay = np.frombuffer(mem[L["delay_off"]:L["delay_off"] + L["delay_bytes"]],
                          dtype=np.int32).reshape(N_CRON, nsec)
    first, last = window[0] - L["base_sec"], window[1] - L["base_sec"]
    cc, cs, delay = cc[:, first:last + 1], cs[:, first:last + 1], delay[:, first:last + 1]
    never = cc == 0
    killed = never & (cs > 0)
    ran_delays = delay[cc > 0]
    crow = {"cron": True, "rules": N_CRON, "window": list(window), "seconds": last - first + 1,
            "expected_runs": int(cc.size), "ran": int((cc > 0).sum()),
            "lost_with_killed_task_worker": int(killed.sum()),
            "missed": int((never & ~killed).sum()), "duplicated": int((cc >= 2).sum()),
            "late": int((ran_delays > 1000).sum()),
            "delay_ms_p50": int(np.percentile(ran_delays, 50)) if ran_delays.size else None,
            "delay_ms_p99": int(np.percentile(ran_delays, 99)) if ran_delays.size else None,
            "delay_ms_max": int(ran_delays.max()) if ran_delays.size else None,
            "rule": "missed = due (job, second) in the window never counted and never started "
                    "in a task worker; started but not counted = lost with a killed task worker"}
    rows.append(crow)
    if crow["missed"]:
        failures.append(f"cron: {crow['missed']} runs missed")
    if crow["duplicated"]:
        failures.append(f"cron: {crow['duplicated']} runs duplicated")
    if crow["lost_with_killed_task_worker"] > kills:
        failures.append("cron: more runs lost with killed task workers than kills")
    return rows, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--kill-every", type=float, default=None,
                        help="seconds between task worker kills (default 60; 15 under 5 minutes)")
    parser.add_argument("--work", type=int, default=30000, help="range() summed by each task (its CPU time)")
    args = parser.parse_args()
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes or 10)
    kill_every = args.kill_every or (60.0 if seconds >= 300 else 15.0)

    import sysv_ipc

    from pyswtask.transport.msgqueue import read_info

    tag = (os.getpid() & 0x3FFF) * 4
    queue_key, cron_key = 0x7D100000 + tag, 0x7D200000 + tag
    t_begin = time.time()
    base_sec = int(t_begin) - 5
    L = layout(seconds, base_sec, 0, queue_key, cron_key, args.work)
    before_m, before_q = _sysv_ids("-m"), _sysv_ids("-q")
    shm = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=0o600, size=L["size"])
    mem = memoryview(shm)
    mem[:] = bytes(L["size"])
    L["shm_key"] = shm.key
    env = dict(os.environ, SOAK_LAYOUT=json.dumps(L))
    seen_pids: set[int] = set()
    failures: list[str] = []
    kills: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    server = command = None
    tmp = tempfile.mkdtemp(prefix="soak")
    errlog = open(os.path.join(tmp, "server.err"), "w+")
    try:
        for name, text in (("server.py", SERVER), ("command.py", COMMAND)):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        server = subprocess.Popen([sys.executable, os.path.join(tmp, "server.py")], env=env,
                                  preexec_fn=os.setpgrp, stdout=subprocess.DEVNULL, stderr=errlog)
        deadline = time.monotonic() + 30
        while (info := read_info(queue_key)) is None or not info.alive():
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the soak server did not start")
            time.sleep(0.05)
        t_ready = time.time()
        command = subprocess.Popen([sys.executable, os.path.join(tmp, "command.py")], env=env,
                                   preexec_fn=os.setpgrp, stdout=subprocess.DEVNULL, stderr=errlog)
        t0 = time.monotonic()
        next_kill, next_sample = t0 + kill_every, t0
        last_cpu: tuple[float, dict[int, int]] | None = None
        rng = random.Random()
        tick = os.sysconf("SC_CLK_TCK")
        while (now := time.monotonic()) < t0 + seconds:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited early ({server.returncode})")
            procs = _group_procs(server.pid)
            seen_pids.update(procs)
            if now >= next_sample:
                rss, anon = {}, {}
                for pid, title in sorted(procs.items()):
                    role = _role(title)
                    if role is not None:
                        rss[role] = _status_kib(pid, "VmRSS")
                        anon[role] = _status_kib(pid, "RssAnon")
                # CPU of the group and the command process since the last sample, over the
                # processes alive at both (a killed task worker's last seconds are not counted).
                cpu = {p: _cpu_ticks(p) for p in [*procs, command.pid]}
                row = {"t": round(now - t0, 1), "rss_kib": rss, "anon_kib": anon}
                if last_cpu is not None:
                    spent = sum(v - last_cpu[1][p] for p, v in cpu.items() if p in last_cpu[1])
                    row["cpu_cores"] = round(spent / tick / (now - last_cpu[0]), 2)
                last_cpu = (now, cpu)
                samples.append(row)
                next_sample += SAMPLE_EVERY
            if now >= next_kill and now < t0 + seconds - 8:
                tws = [p for p, t in procs.items() if t.startswith("pyswtask: task worker")]
                if tws:
                    victim = rng.choice(tws)
                    os.kill(victim, signal.SIGKILL)
                    kills.append({"t": round(now - t0, 1), "pid": victim, "title": procs[victim]})
                next_kill += kill_every
            time.sleep(0.2)
        # Stop the senders, let what is in flight finish, take the last RSS sample.
        mem[:8] = (1).to_bytes(8, "little")
        t_stop = time.time()
        command.wait(60)
        time.sleep(8)
        procs = _group_procs(server.pid)
        roles = {_role(t): p for p, t in sorted(procs.items()) if _role(t) is not None}
        samples.append({"t": round(time.monotonic() - t0, 1), "final": True,
                        "rss_kib": {r: _status_kib(p, "VmRSS") for r, p in roles.items()},
                        "anon_kib": {r: _status_kib(p, "RssAnon") for r, p in roles.items()}})
        t_term = time.time()
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
        if code != 0:
            failures.append(f"master exited with {code}")
        left = _group_procs(server.pid)
        time.sleep(0.5)
        left = _group_procs(server.pid)
        if left:
            failures.append(f"processes of the group outlived the master: {left}")
        window = (int(t_ready) + 3, min(int(t_term) - 2, int(t_stop) + 5))
    except BaseException:
        # Interrupted or failed: the accounting segment goes too (the servers stop below).
        mem.release()
        shm.detach()
        shm.remove()
        raise
    finally:
        for p in (command, server):
            if p is None:
                continue
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
    errlog.seek(0)
    log_text = errlog.read()
    logged_lost = {int(m.group(1)) for m in LOGGED_LOST.finditer(log_text)}
    try:
        rows, more = analyse(mem, L, window, len(kills), logged_lost)
    finally:
        mem.release()
        shm.detach()
        shm.remove()
    failures += more
    for row in rows:
        emit(row)
    emit({"kills": len(kills), "kill_every_s": kill_every, "at": kills})
    for row in samples:
        emit({"rss_sample": True, **row})
    # Flatness: per role, the first sample after the warm-up against the last one.
    warm = [s for s in samples if s["t"] >= WARMUP] or samples
    first, last = warm[0], samples[-1]
    flat = {}
    for role, kib in sorted(first["rss_kib"].items()):
        end = last["rss_kib"].get(role)
        if kib is None or end is None:
            continue
        growth = end - kib
        ok = growth < 20 * 1024 or growth < 0.25 * kib
        flat[role] = {"first_kib": kib, "last_kib": end, "growth_kib": growth,
                      "growth_pct": round(100 * growth / kib, 1), "ok": ok}
        a0, a1 = first["anon_kib"].get(role), last["anon_kib"].get(role)
        if a0 is not None and a1 is not None:
            flat[role].update(anon_first_kib=a0, anon_last_kib=a1, anon_growth_kib=a1 - a0)
        if not ok:
            failures.append(f"RSS of {role} grew by {growth} KiB")
    emit({"rss_flatness": flat, "first_t": first["t"], "last_t": last["t"],
          "bound": "VmRSS growth < 20 MiB or < 25%",
          "note": "VmRSS counts the shared-memory pages a process has touched (the accounting "
                  "segment in task workers, the crontab tables in cronTimer/cronExec); "
                  "RssAnon (anon_*) is the process's own heap"})
    # Nothing of this run may be left in SysV IPC.
    leftovers = []
    for key in (queue_key, cron_key, cron_key + 1):
        for kind in (sysv_ipc.MessageQueue, sysv_ipc.SharedMemory):
            try:
                kind(key)
                leftovers.append(f"{kind.__name__} 0x{key:x}")
            except sysv_ipc.ExistentialError:
                pass
    ours = seen_pids | {os.getpid()}
    for shmid, (key, cpid) in _sysv_ids("-m").items():
        if shmid not in before_m and cpid in ours:
            leftovers.append(f"segment {shmid} key 0x{key:x} created by {cpid}")
    for qid, (key, _) in _sysv_ids("-q").items():
        if qid not in before_q and key in (queue_key, 0):
            leftovers.append(f"queue {qid} key 0x{key:x}")
    if leftovers:
        failures.append(f"SysV IPC left behind: {leftovers}")
    errors = [line for line in log_text.splitlines()
              if ("Traceback" in line or " ERROR " in line) and not LOGGED_LOST.search(line)]
    errlog.close()
    shutil.rmtree(tmp, ignore_errors=True)
    emit({"verdict": "ok" if not failures else "fail", "failures": failures,
          "seconds": seconds, "server_log_errors": errors[:20]})
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
