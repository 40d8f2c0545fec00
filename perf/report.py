"""Turns the JSON lines of perf/run.py into a Markdown report and a chart.

    python perf/report.py [--input perf/results/latest.jsonl] [--md PATH] [--png PATH]

The committed run (perf/results/latest.jsonl, the default input) makes perf/RESULTS.md and
perf/results.png; any other input makes its report beside itself (perf/results/local/run-X.jsonl:
run-X.md and run-X.png), so that a local run never replaces the committed report.

RESULTS.md: the machine, the versions and the date of the run, the issue's targets (met or
not, from the ratios of the same run), then a table per workload. results.png: a bar chart on
a log scale, one group of bars per workload, throughput and latency in separate panels.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
COMMITTED = os.path.join(HERE, "results", "latest.jsonl")

DESCRIPTIONS = {
    "async_throughput": "ASYNC deliver -> finish: each of the 2 workers keeps up to 1,000 tasks in "
                        "flight (100 for 1 MiB), each finish sends the next; tasks/s from the first "
                        "delivery to the last finish, started 300 ms after the workers (both sides) so "
                        "that every process is up. Swoole: `task()` -> `onFinish`; from 8 KiB up Swoole "
                        "passes each task through a temporary file in its `task_tmpdir` (/tmp), and "
                        "swoole_tmpfs is the same with `task_tmpdir` on a tmpfs (/dev/shm). Pool / "
                        "executor: `apply_async` / `submit` with a completion callback.",
    "co_roundtrip": "Sequential CO calls from worker 0 to a task worker that echoes; p50 of the round "
                    "trip. pyswtask: blocking `Task.deliver` (unpinned, task_wait_spin at its "
                    "default). Swoole: blocking `taskwait()` and `taskCo()` in a coroutine. Floor: a "
                    "raw SOCK_SEQPACKET "
                    "ping-pong of the same bytes between two processes.",
    "batch_co_100": "100 tasks delivered and waited on together, repeated, from worker 0; tasks/s. "
                    "pyswtask: `Task.deliver_batch`. Swoole: `taskWaitMulti()` (blocking) and "
                    "`taskCo()` of 100 in a coroutine.",
    "process_to_task": "A user process -> a worker -> a task worker, alternating between the 2 workers; "
                       "tasks/s from the first send to the last finish. pyswtask: "
                       "`Task.deliver_by_process`. Swoole: `sendMessage()` whose `onPipeMessage` calls "
                       "`task()`.",
    "process_pipe_message": "The pipe hop alone: a user process sends messages to the 2 workers, which "
                            "count them (pyswtask `server.send_message`, Swoole `sendMessage`).",
    "queue_oneway": "A separate program delivers through a queue; tasks/s from its first send until "
                    "the task workers have run them all. pyswtask and Swoole: the server's SysV "
                    "message queue, task_ipc_mode 3 (Swoole's producer packs Swoole's task packets "
                    "by hand, as Swoft's QueueTask did). Celery, Dramatiq, Huey: a local Redis, 2 "
                    "worker processes, library defaults.",
    "queue_reply": "The same separate program, sequential calls waiting for the result; p50 round trip. "
                   "pyswtask: CO through the queue, result on a reply socket. Swoole: the task worker "
                   "`msg_send`s the result on a second queue. Brokers: the Redis result store.",
    "table_set": "Shared-memory table writes from the table's own language, 1,024 string keys, an int "
                 "and a 32-byte string column. pyswtask: `Table.set(key, {\"i\": i, \"s\": s32})`; "
                 "Swoole: `Swoole\\Table::set($key, [...])`. Also, not compared, the crontab's "
                 "`RunTable.set_status(row, RUNNING, when)`.",
    "table_get": "Reads of the whole row. pyswtask: `Table.get(key)` (locked, as a dict); Swoole: "
                 "`Swoole\\Table::get($key)`. Also, not compared: one field through the lock-free "
                 "numpy views (`Table.column_view`, the RunTable's `to_numpy()`) and the crontab's "
                 "`RunTable.get(row)`.",
    "table_incr": "Counter increments. pyswtask: `Table.incr(key, 'i', 1)`; Swoole: "
                  "`Swoole\\Table::incr($key, 'i', 1)`. Also, not compared, the crontab's "
                  "`OriginTable.begin(job)` (the job's in-flight counter + 1).",
    "envelope_pack": "Packing the task envelope (name, method, params, type, logid, spanid) of 103 "
                     "bytes: pyswtask's `pack_envelope` against `msgpack.packb` of the same tuple "
                     "(and, not compared, one reused `msgpack.Packer`).",
    "envelope_unpack": "Unpacking it: `unpack_envelope` (unpacks and checks the six fields) against "
                       "`msgpack.unpackb`.",
    "cron_jitter": "20 every-second rules for 30 s (10 s with --quick); jitter = start of the run - "
                   "its due second; value: p99 (ms), with p50, max, missed and duplicated runs "
                   "summed over the rounds. "
                   "pyswtask: cronExec -> worker -> task worker, idle and under a background task "
                   "load; APScheduler 3 (BackgroundScheduler, CronTrigger(second='*')); a croniter + "
                   "sleep loop.",
    "http_hello": "wrk -t2 -c64 on 2 workers: hello world; req/s (p50/p99 ms in the rows).",
    "http_task": "wrk -t2 -c64, each request echoing a 103-byte task in another process; req/s. "
                 "pyswtask `await Task.co`; Swoole `taskCo`; uvicorn `run_in_executor` on a "
                 "ProcessPoolExecutor(2); uvicorn + Celery (`--brokers`): `delay().get()` in a "
                 "thread, a Celery worker of 2 processes on a local Redis.",
    "cluster_async": "Two nodes of 2 worker processes on one local Redis; a separate program "
                     "delivers N tasks without waiting; tasks/s until all have run. Celery, "
                     "Dramatiq, Huey: two worker programs of 2 processes; arq: four worker "
                     "programs. pyswtask: two servers with 2 task workers, the program "
                     "delivering with Task.configure(cluster=...).",
    "cluster_co": "The same, sequential calls waiting for the result through Redis; p50 (us).",
    "redis_xadd": "Redis's floor: redis-benchmark XADD (MAXLEN ~) of a 103-byte field, 50 "
                  "clients; ops/s (p50_us: one client).",
    "redis_xreadgroup": "Redis's floor: redis-py XREADGROUP COUNT 1 + XACK, 100 reads per "
                        "pipeline; msgs/s.",
    "redis_roundtrip": "Redis's floor for cluster_co: the same hops with hiredis on raw sockets "
                       "and nothing else (XADD + XREAD BLOCK; XREADGROUP BLOCK, XADD + XACK); "
                       "p50 (us).",
}

# (title, workload, peer, threshold): met when the median per-round ratio is >= threshold.
TARGETS = (
    ("async throughput at or above Swoole, 103 B", "async_throughput:103B", "swoole", 1.0),
    ("async throughput at or above Swoole, 1 KiB", "async_throughput:1KiB", "swoole", 1.0),
    ("async throughput at or above Swoole, 1 MiB", "async_throughput:1MiB", "swoole", 1.0),
    ("at least 40x Swoole on 8 KiB payloads", "async_throughput:8KiB", "swoole", 40.0),
    ("at least 40x Swoole on 64 KiB payloads", "async_throughput:64KiB", "swoole", 40.0),
    ("at least 5x Swoole with task_tmpdir on tmpfs, 64 KiB", "async_throughput:64KiB",
     "swoole_tmpfs", 5.0),
    ("batch CO at or above Swoole's taskWaitMulti", "batch_co_100", "swoole taskWaitMulti", 1.0),
    ("batch CO at or above Swoole's taskCo", "batch_co_100", "swoole taskCo", 1.0),
    ("process -> task at or above Swoole", "process_to_task", "swoole", 1.0),
    ("CO p50 within 1.2x of Swoole's taskCo", "co_roundtrip", "swoole taskCo", 1 / 1.2),
    ("table set at least 0.5x Swoole\\Table per op", "table_set", "swoole", 0.5),
    ("table get at least 0.5x Swoole\\Table per op", "table_get", "swoole", 0.5),
    ("table incr at least 0.5x Swoole\\Table per op", "table_incr", "swoole", 0.5),
    ("HTTP with a task per request at least 50x uvicorn + Celery", "http_task",
     "uvicorn + Celery", 50.0),
    ("HTTP with a task per request at least 3x uvicorn + ProcessPoolExecutor", "http_task",
     "uvicorn + ProcessPoolExecutor", 3.0),
    *((f"cluster ASYNC at least 5x {peer}", "cluster_async", name, 5.0)
      for name, peer in (("celery", "Celery"), ("dramatiq", "Dramatiq"), ("huey", "Huey"),
                         ("arq", "arq"))),
    *((f"cluster CO p50 at most 0.2x {peer}'s", "cluster_co", name, 5.0)
      for name, peer in (("celery", "Celery"), ("dramatiq", "Dramatiq"), ("huey", "Huey"),
                         ("arq", "arq"))),
)


def load(path: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    meta: dict[str, Any] = {}
    rows, ratios = [], []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if "meta" in r:
                meta = r["meta"]
            elif "ratio" in r:
                ratios.append(r)
            else:
                rows.append(r)
    return meta, rows, ratios


def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) or isinstance(v, int):
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return str(v)


def base_workload(w: str) -> str:
    return w.split(":", 1)[0]


def default_outputs(source: str) -> tuple[str, str]:
    """The report and the chart of a run: perf/RESULTS.md and perf/results.png for the
    committed one, files beside the input for any other."""
    if os.path.abspath(source) == COMMITTED:
        return os.path.join(HERE, "RESULTS.md"), os.path.join(HERE, "results.png")
    stem = os.path.splitext(source)[0]
    return stem + ".md", stem + ".png"


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]], ratios: list[dict[str, Any]],
             png: str | None, source: str = COMMITTED) -> str:
    m, v = meta.get("machine", {}), meta.get("versions", {})
    out = ["# Benchmark results: pyswtask against Swoole and the Python peers", ""]
    out.append(f"Made by `python perf/report.py` from `{os.path.relpath(source, ROOT)}`, which "
               f"`{meta.get('command', 'python perf/run.py')}` wrote on {meta.get('date', '?')} "
               f"({meta.get('duration_s', 0) / 60:.0f} min). Every workload ran for pyswtask and each "
               f"peer in the same run, interleaved over {meta.get('runs', '?')} rounds (the order "
               "reversed every other round); the tables give the median of the rounds with the "
               "lowest and highest, and the ratios are the medians of the ratios taken within each "
               "round. A ratio above 1 favours pyswtask (higher throughput, or lower latency).")
    out.append("")
    out.append("Every side runs 2 workers and 2 task workers whose task returns its input; the task "
               f"is `[1, \"x\" * k, 3.5]` with k chosen so that the packed task is "
               f"{meta.get('task_bytes', 103)} bytes (pyswtask's msgpack envelope, Swoole's "
               "`serialize()`d data), or the size the workload names.")
    out += ["", "## Machine and versions", "", "| | |", "| --- | --- |"]
    out.append(f"| CPU | {m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs |")
    out.append(f"| memory | {m.get('memory', '?')} |")
    out.append(f"| system | {m.get('os', '?')}, Linux {m.get('kernel', '?')} |")
    out.append(f"| load average (1, 5, 15 min) at start / end | {m.get('loadavg_start')} / "
               f"{meta.get('loadavg_end')} |")
    out.append(f"| Python | {v.get('python')} |")
    out.append(f"| pyswtask | {v.get('pyswtask')} (commit {v.get('pyswtask_commit')}), msgpack "
               f"{v.get('msgpack')}, numpy {v.get('numpy')} |")
    if v.get("swoole"):
        out.append(f"| Swoole | {v.get('swoole')} on PHP {v.get('php')} |")
    else:
        out.append("| Swoole | not installed: no Swoole results |")
    out.append(f"| cron peers | APScheduler {v.get('apscheduler')}, croniter {v.get('croniter')} |")
    if v.get("redis"):
        out.append(f"| brokers | Celery {v.get('celery')}, Dramatiq {v.get('dramatiq')}, Huey "
                   f"{v.get('huey')}, arq {v.get('arq')}, redis-py {v.get('redis-py')}, "
                   f"redis-server {v.get('redis')} |")
    else:
        out.append("| brokers | not run (`--brokers` not given, or redis-server missing) |")
    out += ["", "The machine is shared: other work ran on it during the run (see the load "
            "averages), which is why every figure is a median of interleaved rounds and why "
            "min and max are given. Figures from a quiet machine will be higher and tighter.", ""]

    by_pair = {(r["workload"], r["peer"]): r for r in ratios}
    out += ["## Targets", "", "| target | pyswtask / peer | needed | met |", "| --- | --- | --- | --- |"]
    for title, workload, peer, need in TARGETS:
        r = by_pair.get((workload, peer))
        if r is None:
            out.append(f"| {title} | not measured | {need:.2f} | — |")
            continue
        met = "yes" if r["value"] >= need else "**no**"
        out.append(f"| {title} | {r['value']:.2f}x (of medians {r['of_medians']:.2f}x) | "
                   f"{need:.2f}x | {met} |")
    out += ["", "A latency ratio is peer / pyswtask: 0.83x means pyswtask's p50 is 1.2x the peer's.", ""]

    if png:
        out += [f"![results]({os.path.basename(png)})", ""]
    out += ["## Results", ""]
    seen: list[str] = []
    for r in rows:
        if r["workload"] not in seen:
            seen.append(r["workload"])
    for workload in seen:
        group = [r for r in rows if r["workload"] == workload]
        unit = group[0]["unit"]
        out += [f"### {workload}", "", DESCRIPTIONS.get(base_workload(workload), ""), ""]
        latency = not unit.endswith("/s")
        extra = "p99" if latency else None
        head = f"| system | median ({unit}) | min | max | runs |"
        sep = "| --- | ---: | ---: | ---: | ---: |"
        if extra:
            head += " p99 |"
            sep += " ---: |"
        if workload == "cron_jitter":
            head += " p50 ms | max ms | missed | duplicated | runs seen |"
            sep += " ---: | ---: | ---: | ---: | ---: |"
        head += " pyswtask vs it |"
        sep += " ---: |"
        out += [head, sep]
        for r in group:
            ratio = by_pair.get((workload, r["system"]))
            line = (f"| {r['system']}{' (compared)' if r.get('ours') else ''} | {fmt(r['median'])} | "
                    f"{fmt(r['min'])} | {fmt(r['max'])} | {r['runs']} |")
            if extra:
                line += f" {fmt(r.get('p99_us', r.get('p99_ms')))} |"
            if workload == "cron_jitter":
                line += (f" {fmt(r.get('p50_ms'))} | {fmt(r.get('max_ms'))} | {r.get('missed')} | "
                         f"{r.get('duplicated')} | {r.get('records')} of {r.get('expected')} |")
            line += f" {ratio['value']:.2f}x |" if ratio else " |"
            out.append(line)
        out.append("")

    out += ["## Notes", ""]
    out.append("- The table rows compare `pyswtask.Table` (`pyswtask/core/table.pyx`: string keys "
               "hashed to buckets, a lock word per bucket) with `Swoole\\Table`, the same shape on "
               "both sides, in operations per second of CPU time (the fastest of 5 chunks), so "
               "that other processes on the machine decide no ratio. The crontab's own tables, "
               "addressed by row index behind one robust mutex, are reported beside them (wall "
               "clock) and not compared.")
    out.append("- Swoole passes task data of 8,152 bytes or more through a temporary file (in the "
               "system's temp directory, here on disk) for every task; pyswtask sends any size over "
               "its sockets in 64 KiB records. The 8 KiB, 64 KiB and 1 MiB rows compare those two "
               "designs.")
    out.append("- co_roundtrip: pyswtask's CO call and Swoole's `taskwait()` both block the worker; "
               "`taskCo()` runs in a coroutine. pyswtask's `await Task.co()` (asyncio) is not "
               "measured here.")
    out.append("- The brokers run with their defaults (prefork Celery, Dramatiq's Redis broker with "
               "the Results middleware, Huey's Redis storage with `notify_result=True`, arq with "
               "its two polls at 1 ms instead of 0.5 s), 2 worker processes each (two nodes of "
               "them in the cluster rows), on a Redis server the suite starts on 127.0.0.1 "
               "without persistence.")
    errors = meta.get("errors") or []
    if errors:
        out.append(f"- {len(errors)} measurement(s) failed in this run: " + "; ".join(
            f"round {e['round']} {e['group']} {e['system']}: {e['error']}" for e in errors))
    out.append("")
    return "\n".join(out)


def chart(rows: list[dict[str, Any]], path: str, meta: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def panel_of(r: dict[str, Any]) -> str:
        if r["unit"] == "tasks/s":
            return "tasks/s (higher is better)"
        if r["unit"].endswith("/s"):
            # ops/s, and the HTTP (req/s) and Redis floor (msgs/s) rates: rates, not latencies.
            return "ops/s, req/s, msgs/s (higher is better)"
        return "latency in us: p50, cron p99 (lower is better)"

    panels = ["tasks/s (higher is better)", "ops/s, req/s, msgs/s (higher is better)",
              "latency in us: p50, cron p99 (lower is better)"]
    systems: list[str] = []
    for r in rows:
        if r["system"] not in systems:
            systems.append(r["system"])
    # pyswtask in blues, Swoole in oranges, every other peer a colour of its own.
    blues = iter(["#1f77b4", "#6baed6", "#08519c", "#9ecae1", "#3182bd", "#c6dbef"])
    oranges = iter(["#ff7f0e", "#fdae6b", "#d94801", "#fdd0a2"])
    others = iter(plt.get_cmap("tab20").colors[4:] + plt.get_cmap("Set2").colors)
    colors = {}
    for s in systems:
        family = blues if s.startswith("pyswtask") else oranges if s.startswith("swoole") else others
        colors[s] = next(family, "#999999")
    fig, axes = plt.subplots(len(panels), 1, figsize=(18, 17))
    for ax, panel in zip(axes, panels):
        prow = [r for r in rows if panel_of(r) == panel]
        workloads: list[str] = []
        for r in prow:
            if r["workload"] not in workloads:
                workloads.append(r["workload"])
        x = 0.0
        ticks, labels = [], []
        for w in workloads:
            group = [r for r in prow if r["workload"] == w]
            start = x
            for r in group:
                value = r["median"] * (1000 if r["unit"].startswith("ms") else 1)
                ax.bar(x, value, width=0.9, color=colors[r["system"]],
                       edgecolor="black" if r.get("ours") else "none", linewidth=1.2)
                x += 1
            ticks.append((start + x - 1) / 2)
            labels.append(w)
            x += 1.2
        ax.set_yscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=9)
        ax.set_title(panel, fontsize=11)
        ax.grid(axis="y", which="major", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[s]) for s in systems]
    fig.legend(handles, systems, loc="lower center", ncol=4, fontsize=9, frameon=False)
    v = meta.get("versions", {})
    fig.suptitle(f"pyswtask {v.get('pyswtask')} ({v.get('pyswtask_commit')}) vs Swoole "
                 f"{v.get('swoole') or '(not installed)'} and Python peers; medians of "
                 f"{meta.get('runs')} interleaved rounds, {meta.get('date', '')[:10]}, "
                 f"{meta.get('machine', {}).get('cpus')} CPUs (log scale; outlined: pyswtask)",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0.09, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default=COMMITTED,
                        help="a file perf/run.py wrote (default: the committed run, %(default)s)")
    parser.add_argument("--md", help="the report (default: perf/RESULTS.md for the committed run, "
                                     "else the input's name with .md)")
    parser.add_argument("--png", help="the chart (default: perf/results.png for the committed run, "
                                      "else the input's name with .png)")
    args = parser.parse_args()
    md, png = default_outputs(args.input)
    args.md, args.png = args.md or md, args.png or png
    meta, rows, ratios = load(args.input)
    if not rows:
        raise SystemExit(f"{args.input} holds no results")
    chart(rows, args.png, meta)
    with open(args.md, "w") as f:
        f.write(markdown(meta, rows, ratios, args.png, args.input))
    print(f"wrote {os.path.relpath(args.md)} and {os.path.relpath(args.png)}")


if __name__ == "__main__":
    main()
