"""The cluster on a real redis-server: three nodes (three servers, each its own master) and
separate programs sharing the tasks of a queue, results coming back to the delivering node,
a node killed with tasks in flight, dead letters, ``pyswtask cluster``.

Bookkeeping is in the same Redis, under ``test:*``: a task pushes what it started and, through
an idempotence key on its cluster task id, what it did, so counts can be checked exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import redis
from _redis import RedisServer, free_port
from _testbase import ServerProcess, ServerRunner, wait_for

pytestmark = pytest.mark.timeout(120)

# Every node script and program starts with this (after the shared PRELUDE): NODE and URL
# come from argv, the bookkeeping client `book` writes to the cluster's own Redis.
CLUSTER = textwrap.dedent('''
    import redis
    from pyswtask.cluster import current_task
    from pyswtask import ClusterUnavailable, TaskWorkerLost

    NODE, URL = sys.argv[1], sys.argv[2]
    book = redis.Redis.from_url(URL)

    @task(queue="reports")
    class Reports:
        def where(self, x):
            return [x, NODE, os.getpid()]

        def slow(self, x, seconds):
            t = current_task()
            book.rpush("test:started", json.dumps([t.id, NODE, os.getpid(), t.deliveries]))
            time.sleep(seconds)
            # The effect, once per cluster task id however often the task runs.
            if book.set(f"test:effect:{t.id}", NODE, nx=True):
                book.rpush("test:effects", json.dumps([t.id, NODE, x]))
            return [x, NODE]

        def fail(self, message):
            raise ValueError(message)

        def die_once(self, x):
            t = current_task()
            if t.deliveries == 1:
                os.kill(os.getpid(), 9)     # the task worker dies running it
            return [x, NODE, t.deliveries]
''')


def node_script(body: str, **settings: Any) -> str:
    options = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    return CLUSTER + textwrap.dedent(body) + textwrap.dedent(f'''
        server = Server(worker_num=2, task_worker_num=2, cluster=URL, node=NODE, {options})
        server.on("worker_start", globals().get("on_worker_start", lambda s, w: None))
        server.start()
    ''')


def program_script(body: str) -> str:
    return CLUSTER + textwrap.dedent(body)


def start_node(servers: ServerRunner, url: str, node: str, body: str = "",
               **settings: Any) -> ServerProcess:
    settings.setdefault("max_wait_time", 2.0)
    return servers.start(node_script(body, **settings), name=f"node_{node}.py", args=[node, url])


def wait_alive(url: str, *nodes: str, timeout: float = 20.0) -> None:
    r = redis.Redis.from_url(url)
    wait_for(lambda: all(r.exists(f"pyswtask:node:{n}") for n in nodes), timeout)


def finish(proc: ServerProcess, timeout: float = 60.0) -> list[dict[str, Any]]:
    code = proc.wait(timeout)
    assert code == 0, f"exited with {code}\nstdout:\n{proc.out}\nstderr:\n{proc.err[-5000:]}"
    return proc.records()


def kill_group(proc: ServerProcess) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.proc.wait(10)


def jsons(r: redis.Redis, key: str) -> list[list[Any]]:
    return [json.loads(x) for x in r.lrange(key, 0, -1)]


# -- delivery and results across nodes ---------------------------------------------------------

DELIVER_FROM_A = '''
    def on_worker_start(server, worker_id):
        if worker_id != 0:
            return
        def go():
            emit(event="co", value=Task.deliver("Reports", "where", [1], timeout=10))
            try:
                Task.deliver("Reports", "fail", ["no report today"], timeout=10)
            except TaskError as exc:
                emit(event="co_error", type=type(exc).__name__, remote=exc.remote_type,
                     message=exc.remote_message)
            emit(event="local", value=Task.deliver("Demo", "echo", ["here"], timeout=10))
            emit(event="batch", value=Task.deliver_batch(
                [("Reports", "where", [i]) for i in range(4)] + [("Demo", "echo", ["x"])],
                timeout=10))
            done = []
            def finished(task_id, result):
                done.append(task_id)
                emit(event="async", id=task_id, value=result)
                if len(done) == 20:
                    server.after(300, server.shutdown)
            for i in range(20):
                Task.deliver("Reports", "slow", [i, 0.2], Task.TYPE_ASYNC, callback=finished)
            async def coroutine():
                emit(event="await", value=await Task.co("Reports", "where", [7], timeout=10))
                emit(event="co_batch", value=await Task.co_batch(
                    [("Reports", "where", [8]), ("Demo", "echo", ["y"])], timeout=10))
            server.after(10, coroutine)
        server.after(50, go)
'''


def test_tasks_delivered_on_a_run_on_b_and_c_and_results_come_back(
        servers: ServerRunner, redis_server: RedisServer) -> None:
    url = redis_server.url
    for node in "BC":
        start_node(servers, url, node, cluster_prefetch=2)
    wait_alive(url, "B", "C")
    a = start_node(servers, url, "A", DELIVER_FROM_A, cluster_queues=[])
    records = finish(a)
    co = [r["value"] for r in records if r["event"] == "co"]
    assert len(co) == 1 and co[0][0] == 1 and co[0][1] in "BC"
    (error,) = [r for r in records if r["event"] == "co_error"]
    assert error == {"event": "co_error", "type": "TaskError", "remote": "ValueError",
                     "message": "no report today"}
    assert [r["value"] for r in records if r["event"] == "local"] == ["here"]
    (batch,) = [r["value"] for r in records if r["event"] == "batch"]
    assert [b[0] for b in batch[:4]] == [0, 1, 2, 3] and batch[4] == "x"
    assert {b[1] for b in batch[:4]} <= {"B", "C"}
    results = [r for r in records if r["event"] == "async"]
    assert sorted(r["value"][0] for r in results) == list(range(20))
    assert len({r["id"] for r in results}) == 20
    ran_on = {r["value"][1] for r in results}
    assert ran_on == {"B", "C"}, f"20 slow tasks with prefetch 2 ran on {ran_on} only"
    (awaited,) = [r["value"] for r in records if r["event"] == "await"]
    assert awaited[0] == 7 and awaited[1] in "BC"
    (co_batch,) = [r["value"] for r in records if r["event"] == "co_batch"]
    assert co_batch[0][0] == 8 and co_batch[1] == "y"
    r = redis.Redis.from_url(url)
    # Every task acknowledged: nothing pending in the queue's group.
    wait_for(lambda: r.xpending("pyswtask:q:reports", "pyswtask")["pending"] == 0, 10)


def test_user_process_and_separate_program_deliver_cluster_tasks(
        servers: ServerRunner, redis_server: RedisServer, tmp_path: Path) -> None:
    url = redis_server.url
    start_node(servers, url, "B")
    wait_alive(url, "B")
    a = start_node(servers, url, "A", '''
        from pyswtask import process

        @process(name="reporter")
        def reporter(server, proc):
            emit(event="by_process", value=Task.deliver_by_process(
                "Reports", "where", [5], type=Task.TYPE_CO, timeout=10, worker_id=-1))
            server.shutdown()
            proc.sleep(30)
    ''', cluster_queues=[])
    records = finish(a)
    (value,) = [r["value"] for r in records if r["event"] == "by_process"]
    assert value[:2] == [5, "B"]

    program = servers.run(program_script('''
        Task.configure(cluster=URL)
        emit(event="co", value=Task.deliver("Reports", "where", [3], timeout=10))
        try:
            Task.deliver("Reports", "fail", ["from a program"], timeout=10)
        except TaskError as exc:
            emit(event="error", remote=exc.remote_type, message=exc.remote_message)
        ids = [Task.deliver("Reports", "slow", [i, 0], Task.TYPE_ASYNC) for i in range(50)]
        emit(event="ids", value=ids)
        try:
            Task.deliver("Demo", "echo", [1])
        except Exception as exc:
            emit(event="local", type=type(exc).__name__, message=str(exc))
    '''), name="program.py", args=["P", url])
    records = program.records()
    assert [r["value"][:2] for r in records if r["event"] == "co"] == [[3, "B"]]
    assert [r for r in records if r["event"] == "error"] == [
        {"event": "error", "remote": "ValueError", "message": "from a program"}]
    (local,) = [r for r in records if r["event"] == "local"]
    assert local["type"] == "DeliveryError" and "not a cluster task" in local["message"]
    r = redis.Redis.from_url(url)
    # ASYNC from a program: written behind at exit at the latest, each run once.
    wait_for(lambda: r.llen("test:effects") == 50, 20)
    assert sorted(e[2] for e in jsons(r, "test:effects")) == list(range(50))
    # The program's reply stream is gone with it.
    assert not r.keys("pyswtask:r:*:program")


# -- a node dies with tasks in flight ----------------------------------------------------------

@pytest.mark.slow
def test_node_killed_with_tasks_in_flight_their_tasks_run_elsewhere_once(
        servers: ServerRunner, redis_server: RedisServer) -> None:
    url = redis_server.url
    r = redis.Redis.from_url(url)
    settings = dict(cluster_prefetch=2, cluster_visibility_timeout=3.0)
    b = start_node(servers, url, "B", **settings)
    wait_alive(url, "B")
    c = start_node(servers, url, "C", **settings)
    a = start_node(servers, url, "A", '''
        def on_worker_start(server, worker_id):
            if worker_id != 0:
                return
            done = []
            def finished(task_id, result):
                done.append(task_id)
                emit(event="async", id=task_id, value=result)
                if len(done) == 30:
                    server.after(300, server.shutdown)
            def go():
                for i in range(30):
                    Task.deliver("Reports", "slow", [i, 1.0], Task.TYPE_ASYNC, callback=finished)
            server.after(50, go)
    ''', **settings)
    wait_alive(url, "A", "C")
    # B has tasks running: kill its whole server at once, master and all.
    wait_for(lambda: any(s[1] == "B" for s in jsons(r, "test:started")), 30)
    kill_group(b)
    started_on_b = {s[0] for s in jsons(r, "test:started") if s[1] == "B"}
    records = finish(a, 90)
    results = [x for x in records if x["event"] == "async"]
    # Every task's result came back to A exactly once, and its effect happened exactly once.
    assert sorted(x["value"][0] for x in results) == list(range(30))
    assert len({x["id"] for x in results}) == 30
    effects = jsons(r, "test:effects")
    assert sorted(e[2] for e in effects) == list(range(30))
    assert len({e[0] for e in effects}) == 30
    # What B had in flight and did not finish ran again on A or C, as a second delivery.
    unfinished = started_on_b - {e[0] for e in effects if e[1] == "B"}
    assert unfinished, "B was killed with no task in flight"
    again = [s for s in jsons(r, "test:started") if s[0] in unfinished and s[1] != "B"]
    assert {s[0] for s in again} == unfinished
    assert {s[1] for s in again} <= {"A", "C"} and all(s[3] >= 2 for s in again)
    assert r.xpending("pyswtask:q:reports", "pyswtask")["pending"] == 0
    c.kill()


@pytest.mark.slow
def test_task_past_max_deliveries_goes_to_dead_letters_and_co_caller_gets_lost(
        servers: ServerRunner, redis_server: RedisServer) -> None:
    url = redis_server.url
    r = redis.Redis.from_url(url)
    settings = dict(cluster_visibility_timeout=2.0, cluster_max_deliveries=1)
    b = start_node(servers, url, "B", **settings)
    wait_alive(url, "B")
    a = start_node(servers, url, "A", '''
        def on_worker_start(server, worker_id):
            if worker_id != 0:
                return
            def go():
                try:
                    Task.deliver("Reports", "slow", [1, 60], timeout=40)
                except TaskWorkerLost as exc:
                    emit(event="lost", message=str(exc))
                server.shutdown()
            server.after(50, go)
    ''', cluster_queues=[], **settings)
    wait_for(lambda: r.llen("test:started") == 1, 20)
    c = start_node(servers, url, "C", **settings)
    wait_alive(url, "C")
    kill_group(b)
    records = finish(a, 60)
    (lost,) = [x for x in records if x["event"] == "lost"]
    assert "delivered 1 time(s) without a result" in lost["message"]
    stat = cli(["cluster", "stat", "--url", url, "--json"])
    (queue,) = json.loads(stat.stdout)["queues"]
    assert queue["queue"] == "reports" and queue["dead_letters"] == 1 and queue["pending"] == 0
    listed = cli(["cluster", "dead-letters", "--url", url, "--json"])
    (letter,) = json.loads(listed.stdout)
    assert letter["task"] == "Reports" and letter["method"] == "slow"
    assert letter["deliveries"] == "1" and "not acknowledged within 2.0 s" in letter["error"]
    # Put back, it runs again on the surviving node (a fresh delivery count).
    assert cli(["cluster", "dead-letters", "--url", url, "--requeue"]).stdout.startswith(
        "1 dead letter(s) put back")
    wait_for(lambda: any(s[1] == "C" for s in jsons(r, "test:started")), 20)
    assert r.xlen("pyswtask:dead:reports") == 0
    c.kill()


@pytest.mark.slow
def test_task_worker_dying_mid_task_leaves_the_task_for_a_second_delivery(
        servers: ServerRunner, redis_server: RedisServer) -> None:
    url = redis_server.url
    start_node(servers, url, "B", cluster_visibility_timeout=2.0)
    wait_alive(url, "B")
    program = servers.run(program_script('''
        Task.configure(cluster=URL)
        emit(event="co", value=Task.deliver("Reports", "die_once", [6], timeout=30))
    '''), name="program.py", args=["P", url], timeout=60)
    # Not acknowledged when its task worker died: claimed after the visibility timeout and
    # run again (on B, the only node), and the caller gets that run's result.
    assert [r["value"] for r in program.by_event("co")] == [[6, "B", 2]]
    r = redis.Redis.from_url(url)
    assert r.hlen("pyswtask:err:reports") == 0
    assert r.xpending("pyswtask:q:reports", "pyswtask")["pending"] == 0
    # The dead task worker's consumer is deleted by B's bridge, once nothing is pending on it;
    # those of the live ones stay.
    def names() -> set[str]:
        return {c["name"].decode() for c in r.xinfo_consumers("pyswtask:q:reports", "pyswtask")}

    wait_for(lambda: all(_alive(int(n.rsplit(":", 1)[1])) for n in names()), 10)
    assert names()


def test_a_task_pending_on_a_live_consumer_that_never_got_it_runs(
        servers: ServerRunner, redis_server: RedisServer) -> None:
    # What Redis does when it serves a task worker's read on a connection the task worker
    # already dropped: the task is pending on its consumer, which never saw it, and B's bridge
    # keeps it from being claimed as long as that task worker lives. The consumer finds it.
    from pyswtask.cluster.entries import task_fields
    from pyswtask.envelope import TYPE_ASYNC, pack_task

    url = redis_server.url
    r = redis.Redis.from_url(url)
    start_node(servers, url, "B", cluster_visibility_timeout=3.0)
    wait_alive(url, "B")
    wait_for(lambda: r.exists("pyswtask:q:reports") and len(
        r.xinfo_consumers("pyswtask:q:reports", "pyswtask")) >= 2, 20)
    consumer = r.xinfo_consumers("pyswtask:q:reports", "pyswtask")[0]["name"].decode()
    fields = task_fields("test/1/1", "Reports", "slow",
                         pack_task("Reports", "slow", [42, 0], TYPE_ASYNC, 0), TYPE_ASYNC, "",
                         -1, 0, 0, 0.0)
    pipe = r.pipeline(transaction=True)     # read before any blocked consumer is served
    pipe.xadd("pyswtask:q:reports", fields)
    pipe.xreadgroup("pyswtask", consumer, {"pyswtask:q:reports": ">"}, count=1)
    _, got = pipe.execute()
    assert got[0][1][0][1][b"id"] == b"test/1/1"
    wait_for(lambda: r.llen("test:effects") == 1, 15)
    assert [e[2] for e in jsons(r, "test:effects")] == [42]
    wait_for(lambda: r.xpending("pyswtask:q:reports", "pyswtask")["pending"] == 0, 10)


def test_stopping_node_runs_what_it_took_and_deletes_its_consumers(
        servers: ServerRunner, redis_server: RedisServer) -> None:
    url = redis_server.url
    r = redis.Redis.from_url(url)
    b = start_node(servers, url, "B")
    wait_alive(url, "B")
    program = servers.run(program_script('''
        Task.configure(cluster=URL)
        emit(event="co", value=Task.deliver("Reports", "where", [3], timeout=20))
    '''), name="program.py", args=["P", url], timeout=60)
    ((x, node, pid),) = [x["value"] for x in program.by_event("co")]
    assert (x, node) == (3, "B")
    # Each of B's task workers is a consumer of its own, named after B and its pid.
    names = {c["name"].decode() for c in r.xinfo_consumers("pyswtask:q:reports", "pyswtask")}
    workers = {n for n in names if _parent_of(int(n.rsplit(":", 1)[1])) == b.pid}
    assert len(workers) == 2 and f"B:{pid}" in workers and all(n.startswith("B:") for n in names)
    # Stopped while its task workers wait in XREADGROUP: it stops within max_wait_time and a
    # margin, and leaves no consumer and nothing pending behind.
    import time
    started = time.monotonic()
    os.kill(b.pid, signal.SIGTERM)
    assert b.wait(30) == 0, b.err
    assert time.monotonic() - started < 15
    assert r.xinfo_consumers("pyswtask:q:reports", "pyswtask") == []
    assert r.xpending("pyswtask:q:reports", "pyswtask")["pending"] == 0
    assert not r.exists("pyswtask:node:B")


WHERE = '''
    @task(queue="reports")
    class Where:
        def context(self):
            c = Task.current()
            return [c.id, c.name, c.method, c.type, c.origin_role, c.attempt, c.worker_id,
                    c.task_worker_id, current_task().deliveries]
'''


def test_a_cluster_task_is_current_and_counted_as_a_task_of_its_task_worker(
        servers: ServerRunner, redis_server: RedisServer) -> None:
    from pyswtask import stats

    url = redis_server.url
    b = start_node(servers, url, "B", WHERE)
    wait_alive(url, "B")
    program = servers.run(program_script(textwrap.dedent(WHERE) + textwrap.dedent('''
        Task.configure(cluster=URL)
        for _ in range(2):
            emit(event="context", value=Task.deliver("Where", "context", [], timeout=20))
        try:
            Task.deliver("Reports", "fail", ["counted"], timeout=20)
        except TaskError as exc:
            emit(event="failed", remote=exc.remote_type)
    ''')), name="program.py", args=["P", url], timeout=60)
    contexts = [x["value"] for x in program.by_event("context")]
    assert len(contexts) == 2, program.err
    for c in contexts:
        # Task.current() sees the cluster's runner, as for a separate program's task.
        assert c[:7] == [0, "pyswtask.cluster", "run", "async", "program", 1, None]
        assert c[7] in (2, 3) and c[8] == 1
    assert [x["remote"] for x in program.by_event("failed")] == ["ValueError"]
    # Counted in B's stats segment as the channels' tasks are, before each result went back.
    snap = stats.read(pid=b.pid)
    assert snap["tasks"]["run"] == 3 and snap["tasks"]["failed"] == 1
    run = snap["task_methods"]["pyswtask.cluster.run"]
    assert (run["ok"], run["failed"]) == (2, 1) and run["buckets"][-1] == 3
    assert sum(tw["run"] for tw in snap["task_workers"]) == 3


# -- faults ------------------------------------------------------------------------------------

def test_redis_unreachable_at_start_fails_the_start_naming_the_url(
        servers: ServerRunner) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    proc = servers.run(program_script('''
        server = Server(worker_num=1, task_worker_num=1, cluster=URL, node=NODE)
        try:
            server.start()
        except ClusterUnavailable as exc:
            emit(event="error", message=str(exc))
    '''), args=["A", url])
    (error,) = proc.by_event("error")
    assert error["message"].startswith(f"cannot reach the cluster's Redis at {url}: ")


def test_password_protected_redis(servers: ServerRunner, tmp_path: Path) -> None:
    secured = RedisServer(tmp_path / "secured", password="s3cret-pass")
    secured.start()
    try:
        url = secured.url
        start_node(servers, url, "B")
        wait_alive(url, "B")
        program = servers.run(program_script('''
            Task.configure(cluster=URL)
            emit(event="co", value=Task.deliver("Reports", "where", [9], timeout=10))
            Task.configure(cluster=URL.replace("s3cret-pass", "wrong"))
            try:
                Task.deliver("Reports", "where", [9], timeout=10)
            except ClusterUnavailable as exc:
                emit(event="refused", message=str(exc))
        '''), name="program.py", args=["P", url])
        assert [r["value"][:2] for r in program.by_event("co")] == [[9, "B"]]
        (refused,) = program.by_event("refused")
        assert "refused the credentials" in refused["message"]
        assert "wrong" not in refused["message"] and ":***@127.0.0.1" in refused["message"]
    finally:
        servers.close()
        secured.stop()


def test_tls_redis(servers: ServerRunner, tmp_path: Path) -> None:
    secured = RedisServer(tmp_path / "tls", tls=True)
    try:
        secured.start()
    except RuntimeError as exc:
        if "tls" in str(exc).lower():
            pytest.skip(f"this redis-server has no TLS: {exc}")
        raise
    try:
        url = secured.url
        assert url.startswith("rediss://")
        start_node(servers, url, "B")
        wait_alive(url, "B")
        program = servers.run(program_script('''
            Task.configure(cluster=URL)
            emit(event="co", value=Task.deliver("Reports", "where", [4], timeout=10))
        '''), name="program.py", args=["P", url])
        assert [r["value"][:2] for r in program.by_event("co")] == [[4, "B"]]
    finally:
        servers.close()
        secured.stop()


STALL = '''
    def on_worker_start(server, worker_id):
        if worker_id != 0:
            return
        state = {"n": 0, "async": 0, "results": 0, "stop": False}
        def finished(task_id, result):
            state["results"] += 1
            emit(event="async_result", id=task_id, value=result)
        def tick(timer_id):
            if os.path.exists("stop"):
                if not state["stop"]:
                    state["stop"] = True
                    emit(event="stopping", sent=state["async"])
                if state["results"] >= state["async"]:
                    server.clear_timer(timer_id)
                    server.shutdown()
                return
            state["n"] += 1
            n = state["n"]
            emit(event="local", value=Task.deliver("Demo", "echo", [n], timeout=5))
            Task.deliver("Reports", "where", [n], Task.TYPE_ASYNC, callback=finished)
            state["async"] += 1
            started = time.monotonic()
            try:
                value = Task.deliver("Reports", "where", [n], timeout=5)
                emit(event="co", n=n, value=value, took=time.monotonic() - started)
            except Exception as exc:
                emit(event="co", n=n, error=type(exc).__name__, message=str(exc),
                     took=time.monotonic() - started)
        server.tick(200, tick)
'''


def run_through_outage(servers: ServerRunner, redis_server: RedisServer, tmp_path: Path,
                       outage: Any) -> ServerProcess:
    url = redis_server.url
    start_node(servers, url, "B")
    wait_alive(url, "B")
    a = start_node(servers, url, "A", STALL, cluster_queues=[])
    wait_for(lambda: a.proc.poll() is None and (tmp_path / "node_A.py").exists(), 5)
    wait_alive(url, "A")
    import time
    time.sleep(1.5)
    outage()
    time.sleep(4.0)
    (tmp_path / "stop").write_text("")
    finish(a, 90)
    return a


def check_outage(a: ServerProcess) -> None:
    try:
        check_outage_records(a.records())
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nnode A's log:\n{a.err[-6000:]}") from None


def check_outage_records(records: list[dict[str, Any]]) -> None:
    co = [r for r in records if r["event"] == "co"]
    failed = [r for r in co if "error" in r]
    assert failed, "no CO delivery saw the outage"
    # The documented error only, within the CO timeout and a margin: nothing hangs.
    assert {r["error"] for r in failed} == {"ClusterUnavailable"}, failed
    assert all("unreachable" in r["message"] for r in failed)
    assert max(r["took"] for r in co) < 8.0
    # Cluster tasks work again once Redis is back.
    assert "value" in co[-1] and co[-1]["value"][:2] == [co[-1]["n"], "B"]
    # Local tasks never stopped working.
    local = [r["value"] for r in records if r["event"] == "local"]
    assert local == list(range(1, len(local) + 1)) and len(local) == len(co)
    # Nothing lost: every ASYNC delivery finished once, with its value.
    (stopping,) = [r for r in records if r["event"] == "stopping"]
    results = [r for r in records if r["event"] == "async_result"]
    assert len(results) == stopping["sent"] and len({r["id"] for r in results}) == len(results)
    assert sorted(r["value"][0] for r in results) == list(range(1, stopping["sent"] + 1))


@pytest.mark.slow
def test_redis_stalled_for_3_seconds(servers: ServerRunner, redis_server: RedisServer,
                                     tmp_path: Path) -> None:
    import time

    def stall() -> None:
        redis_server.pause()
        try:
            time.sleep(3.0)
        finally:
            redis_server.resume()

    check_outage(run_through_outage(servers, redis_server, tmp_path, stall))


LOCAL_THROUGH_STALL = CLUSTER + textwrap.dedent('''
    def on_worker_start(server, worker_id):
        if worker_id != 0:
            return
        def tick(timer_id):
            if os.path.exists("stop"):
                server.clear_timer(timer_id)
                deadline = time.monotonic() + 20
                while True:
                    try:
                        emit(event="cluster", value=Task.deliver("Reports", "where", [1],
                                                                 timeout=5))
                        break
                    except ClusterUnavailable:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)
                server.shutdown()
                return
            started = time.monotonic()
            emit(event="local", value=Task.deliver("Demo", "echo", ["x"], timeout=10),
                 at=time.time(), took=time.monotonic() - started)
        server.tick(100, tick)

    # One task worker: the local tasks and the consumer blocked on Redis share its loop.
    server = Server(worker_num=1, task_worker_num=1, cluster=URL, node=NODE, max_wait_time=2.0)
    server.on("worker_start", on_worker_start)
    server.start()
''')


@pytest.mark.slow
def test_local_tasks_go_on_while_redis_stalls_under_a_blocked_consumer(
        servers: ServerRunner, redis_server: RedisServer, tmp_path: Path) -> None:
    import time

    url = redis_server.url
    r = redis.Redis.from_url(url)
    b = servers.start(LOCAL_THROUGH_STALL, name="node_B.py", args=["B", url])
    wait_alive(url, "B")
    wait_for(lambda: r.exists("pyswtask:q:reports") and any(
        c["name"].startswith(b"B:") for c in r.xinfo_consumers("pyswtask:q:reports",
                                                               "pyswtask")), 20)
    time.sleep(0.5)
    paused = time.time()
    redis_server.pause()
    try:
        time.sleep(3.0)
    finally:
        redis_server.resume()
    resumed = time.time()
    time.sleep(1.0)
    (tmp_path / "stop").write_text("")
    records = finish(b, 60)
    local = [x for x in records if x["event"] == "local"]
    assert all(x["value"] == "x" for x in local)
    # The task worker waits on a stalled Redis only to connect, at most the socket timeout
    # (2 s): local tasks kept running through the stall.
    assert max(x["took"] for x in local) < 4.0, sorted(x["took"] for x in local)[-5:]
    during = [x for x in local if paused + 0.2 < x["at"] < resumed]
    assert len(during) >= 5, f"{len(during)} local tasks ran during the 3 s stall"
    # The consumer reads again once Redis is back: a cluster task runs on B.
    ((value,),) = [[x["value"]] for x in records if x["event"] == "cluster"]
    assert value[:2] == [1, "B"]


@pytest.mark.slow
def test_redis_restarted(servers: ServerRunner, redis_server: RedisServer,
                         tmp_path: Path) -> None:
    import time

    def restart() -> None:
        redis_server.stop()
        time.sleep(3.0)
        redis_server.start()

    check_outage(run_through_outage(servers, redis_server, tmp_path, restart))


# Records a test reads while the node runs (emit's go to stdout, read once it exited).
NOTE = textwrap.dedent('''
    def note(**fields):
        emit(**fields)
        fd = os.open("notes.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, (json.dumps(fields) + "\\n").encode())
        finally:
            os.close(fd)
''')


def notes(folder: Path, event: str) -> list[dict[str, Any]]:
    path = folder / "notes.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r["event"] == event]


HOLD = NOTE + textwrap.dedent('''
    def on_worker_start(server, worker_id):
        if worker_id != 0:
            return
        results = []
        def finished(task_id, result):
            results.append(task_id)
            if isinstance(result, Exception):
                note(event="async", id=task_id, error=type(result).__name__, message=str(result))
            else:
                note(event="async", id=task_id, value=result)
            if len(results) == 11:
                server.after(200, server.shutdown)
        phases = set()
        def tick(timer_id):
            for phase, count in (("down", 8), ("back", 3)):
                if phase not in phases and os.path.exists(phase):
                    phases.add(phase)
                    for i in range(count):
                        Task.deliver("Reports", "slow", [f"{phase}{i}", 0], Task.TYPE_ASYNC,
                                     callback=finished)
                    note(event="sent", phase=phase)
        server.tick(50, tick)
''')


@pytest.mark.slow
def test_async_held_while_redis_is_down_up_to_the_hold_bounds(
        servers: ServerRunner, redis_server: RedisServer, tmp_path: Path) -> None:
    """cluster_hold_max ASYNC deliveries are held while Redis is down; more finish at once,
    and the held ones after cluster_hold_timeout, all with ClusterUnavailable; none runs
    later, and deliveries after Redis is back run."""
    import time

    url = redis_server.url
    start_node(servers, url, "B")
    wait_alive(url, "B")
    a = start_node(servers, url, "A", HOLD, cluster_queues=[], cluster_hold_max=5,
                   cluster_hold_timeout=2.0)
    wait_alive(url, "A")
    redis_server.stop()
    try:
        started = time.monotonic()
        (tmp_path / "down").write_text("")
        wait_for(lambda: len(notes(tmp_path, "async")) >= 3, 10)
        at_once = time.monotonic() - started
        early = notes(tmp_path, "async")
        wait_for(lambda: len(notes(tmp_path, "async")) >= 8, 15)
        held_for = time.monotonic() - started
    finally:
        redis_server.start()
    (tmp_path / "back").write_text("")
    records = finish(a, 60)
    results = {r["id"]: r for r in records if r["event"] == "async"}
    assert len(results) == 11, records
    down = [r for r in results.values() if "error" in r]
    assert len(down) == 8 and {r["error"] for r in down} == {"ClusterUnavailable"}
    assert all("unreachable" in r["message"] for r in down), down
    # Beyond the bound: at once (before the held ones, whose bound is 2 s).
    assert len(early) == 3 and at_once < 1.8, (early, at_once)
    # The held ones: after their 2 s, within the heartbeat's second and a margin.
    assert 1.8 <= held_for < 8.0, held_for
    back = sorted(r["value"][0] for r in results.values() if "value" in r)
    assert back == ["back0", "back1", "back2"]
    # What failed never reached Redis: only the deliveries after the restart ran.
    r = redis.Redis.from_url(url)
    started_ids = jsons(r, "test:started")
    assert len(started_ids) == 3 and {s[1] for s in started_ids} == {"B"}


def test_stopping_node_passes_back_its_workers_results_first(
        servers: ServerRunner, redis_server: RedisServer, tmp_path: Path) -> None:
    """A node stopped right after delivering ASYNC cluster tasks still gets every result
    (its finish callbacks fire) before its workers stop."""
    url = redis_server.url
    start_node(servers, url, "B")
    wait_alive(url, "B")
    a = start_node(servers, url, "A", NOTE + textwrap.dedent('''
        def on_worker_start(server, worker_id):
            if worker_id != 0:
                return
            def finished(task_id, result):
                emit(event="async", id=task_id, value=result)
            def go():
                for i in range(6):
                    Task.deliver("Reports", "slow", [i, 0.5], Task.TYPE_ASYNC,
                                 callback=finished)
                note(event="sent")
            server.after(50, go)
    '''), cluster_queues=[], max_wait_time=10.0)
    wait_for(lambda: notes(tmp_path, "sent") or a.proc.poll() is not None, 20)
    assert notes(tmp_path, "sent"), a.wait(1)
    os.kill(a.pid, signal.SIGTERM)
    records = finish(a, 30)
    results = [r for r in records if r["event"] == "async"]
    # B's two task workers need about 1.5 s for the six; all came back to the stopping node.
    assert sorted(r["value"][0] for r in results) == list(range(6)), a.err[-3000:]
    assert {r["value"][1] for r in results} == {"B"}


# -- the CLI ------------------------------------------------------------------------------------

def cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "pyswtask", *args], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done


def test_cluster_stat_shows_nodes_queues_and_pending(servers: ServerRunner,
                                                     redis_server: RedisServer) -> None:
    url = redis_server.url
    r = redis.Redis.from_url(url)
    b = start_node(servers, url, "B", cluster_prefetch=2)
    wait_alive(url, "B")
    program = servers.start(program_script('''
        Task.configure(cluster=URL)
        for i in range(5):
            Task.deliver("Reports", "slow", [i, 30], Task.TYPE_ASYNC)
        Task.flush()
    '''), name="program.py", args=["P", url])
    assert program.wait(30) == 0, program.err
    # Each of B's two task workers took one (a task worker takes one at a time).
    wait_for(lambda: r.llen("test:started") == 2, 20)
    wait_for(lambda: r.xpending("pyswtask:q:reports", "pyswtask")["pending"] == 2, 20)
    stat = json.loads(cli(["cluster", "stat", "--url", url, "--json"]).stdout)
    (node,) = stat["nodes"]
    assert node["node"] == "B" and node["queues"] == ["reports"] and node["task_workers"] == 2
    assert 0 < node["expires_in_ms"] <= 5000
    (queue,) = stat["queues"]
    assert queue["queue"] == "reports" and queue["length"] == 5 and queue["pending"] == 2
    # One consumer per task worker, named after B and the task worker's pid.
    assert sorted(queue["consumers"].values()) == [1, 1]
    started_by = {f"B:{s[2]}" for s in jsons(r, "test:started")}
    assert set(queue["consumers"]) == started_by
    for name in queue["consumers"]:
        assert _parent_of(int(name.split(":")[1])) == b.pid
    assert 0 <= queue["oldest_pending_age"] < 30 and queue["dead_letters"] == 0
    text = cli(["cluster", "stat", "--url", url]).stdout
    assert "nodes alive: 1" in text and "reports" in text
    bad = subprocess.run([sys.executable, "-m", "pyswtask", "cluster", "stat", "--url",
                          f"redis://127.0.0.1:{free_port()}/0"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 1 and "cannot reach the cluster's Redis" in bad.stderr


def test_cluster_prefetch_is_split_among_the_task_workers(servers: ServerRunner,
                                                          redis_server: RedisServer) -> None:
    import time

    url = redis_server.url
    r = redis.Redis.from_url(url)
    start_node(servers, url, "B", cluster_prefetch=4)
    wait_alive(url, "B")
    program = servers.start(program_script('''
        Task.configure(cluster=URL)
        for i in range(10):
            Task.deliver("Reports", "slow", [i, 30], Task.TYPE_ASYNC)
        Task.flush()
    '''), name="program.py", args=["P", url])
    assert program.wait(30) == 0, program.err
    # Each of the two task workers took 4 / 2 tasks in one read, runs the first, and reads
    # no more until they ran: 4 unacknowledged on the node, 6 left for other nodes.
    wait_for(lambda: r.llen("test:started") == 2, 20)
    wait_for(lambda: r.xpending("pyswtask:q:reports", "pyswtask")["pending"] == 4, 20)
    time.sleep(1.0)
    pending = r.xpending("pyswtask:q:reports", "pyswtask")
    assert pending["pending"] == 4
    assert sorted(int(c["pending"]) for c in pending["consumers"]) == [2, 2]
    assert r.llen("test:started") == 2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2:].split()[1])


# -- bad input ---------------------------------------------------------------------------------

def test_bad_queue_names_and_urls_are_refused_naming_them() -> None:
    from pyswtask import Server, Task, task

    with pytest.raises(TypeError, match="@task queue must be a non-empty string"):
        task(queue="")
    with pytest.raises(TypeError, match="'two words'"):
        task(queue="two words")
    with pytest.raises(ValueError, match=r"setting cluster must be a Redis URL .*'http://x'"):
        Server(cluster="http://x")
    with pytest.raises(ValueError, match=r"Task.configure\(cluster=...\) must be a Redis URL"):
        Task.configure(cluster="localhost:6379")
    with pytest.raises(ValueError, match="setting cluster_queues"):
        Server(cluster="redis://127.0.0.1:1/0", cluster_queues=[""])
