"""Cron once per cluster: three servers (each its own master) on one real redis-server race for
each (rule, due second); exactly one runs it, a killed lease-holder's run is taken over, and a
stalled Redis delays runs without running any twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from typing import Any

import pytest
from _redis import RedisServer, free_port
from _testbase import ServerProcess, ServerRunner, wait_for

from pyswtask import ClusterUnavailable, cron
from pyswtask._core import RunStatus
from pyswtask.cluster import connect

# Indented like the test bodies it is prepended to. argv: node name, Redis URL.
NODE_PRELUDE = textwrap.indent(textwrap.dedent('''
    from pyswtask import scheduled
    from pyswtask.cron import due_second

    NODE, URL = sys.argv[1], sys.argv[2]

    def ran(name):
        emit(event="ran", job=name, due=due_second.get(), t=time.time(), node=NODE)
'''), " " * 8)


def rules(n: int, cluster_flag: bool = True, prefix: str = "r") -> str:
    """n every-second methods (source, indented for a class body in a test script)."""
    flag = ", once_per_cluster=True" if cluster_flag else ""
    return "".join(f'''
            @scheduled(cron="* * * * * *"{flag})
            def {prefix}{i}(self):
                ran("{prefix}{i}")
''' for i in range(n))


def start_nodes(servers: ServerRunner, redis: RedisServer, body: str,
                names: list[str]) -> list[ServerProcess]:
    return [servers.start(NODE_PRELUDE + body, name=f"{name}.py", args=[name, redis.url])
            for name in names]


def crontab_going(node: ServerProcess) -> bool:
    """Whether the node's exec process settled a run already (ran it or saw another node do
    so): under load, forking a server's processes may take seconds."""
    try:
        _origin, table, segments = cron.attach(cron.default_key(node.pid))
    except (LookupError, ValueError):    # not there yet, or being made
        return False
    try:
        return any(r["status"] in (RunStatus.DONE, RunStatus.ELSEWHERE) for r in table.rows())
    finally:
        del table
        for seg in segments:
            seg.detach()


def wait_going(nodes: list[ServerProcess]) -> None:
    wait_for(lambda: all(crontab_going(n) for n in nodes), 60, interval=0.2)


def stop(nodes: list[ServerProcess], timeout: float = 30.0) -> None:
    for node in nodes:
        if node.proc.poll() is None:
            os.kill(node.pid, signal.SIGTERM)
    for node in nodes:
        assert node.wait(timeout) == 0, node.err


def runs(nodes: list[ServerProcess]) -> list[dict[str, Any]]:
    return [r for node in nodes for r in node.by_event("ran")]


def assert_once(nodes: list[ServerProcess], jobs: list[str], first: int, last: int) -> Counter:
    """Every (job, second) in [first, last] ran exactly once over all nodes, and none twice
    anywhere; returns how many runs each node did."""
    ours = [r for r in runs(nodes) if r["job"] in jobs]
    seen = Counter((r["job"], r["due"]) for r in ours)
    twice = {k: n for k, n in seen.items() if n > 1}
    assert not twice, f"ran more than once: {sorted(twice)[:10]}"
    missing = [(job, sec) for job in jobs for sec in range(first, last + 1)
               if (job, sec) not in seen]
    assert not missing, (f"never ran: {missing[:10]} ({len(missing)} in all)\n"
                         + "\n".join(n.err[-3000:] for n in nodes))
    return Counter(r["node"] for r in ours)


NODE_SERVER = '''
        @task("jobs")
        class Jobs:
            {rules}

        server = Server(worker_num=1, task_worker_num=2, cron=True, cluster=URL, node=NODE,
                        pid_file=NODE + ".pid"{more})
        sys.exit(server.start())
'''


def node_server(n: int, cluster_flag: bool = True, more: str = "") -> str:
    return NODE_SERVER.replace("{rules}", rules(n, cluster_flag).strip()).replace(
        "{more}", more)


def cron_show(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyswtask", "cron", "show", *args],
                          capture_output=True, text=True, timeout=30)


def run_three_nodes(servers: ServerRunner, redis: RedisServer, n_rules: int, seconds: float,
                    cluster_flag: bool, more: str = "") -> tuple[list[ServerProcess], int, int]:
    nodes = start_nodes(servers, redis, node_server(n_rules, cluster_flag, more),
                        ["node-a", "node-b", "node-c"])
    wait_going(nodes)
    first = int(time.time()) + 1
    time.sleep(seconds)
    last = int(time.time()) - 2
    return nodes, first, last


@pytest.mark.timeout(120)
def test_three_nodes_run_each_second_of_each_rule_once(servers: ServerRunner,
                                                      redis_server: RedisServer) -> None:
    nodes, first, last = run_three_nodes(servers, redis_server, 5, 6.0, cluster_flag=True)
    show = cron_show("--pid-file", str(nodes[0].path.parent / "node-a.pid"),
                     "--cluster", redis_server.url, "--last", "400")
    stop(nodes)
    jobs = [f"r{i}" for i in range(5)]
    assert_once(nodes, jobs, first, last)
    assert show.returncode == 0, show.stderr
    # node-a's tables: what it ran is DONE, what another node ran is ELSEWHERE, unless it won
    # every race; the cluster section names the holders and the outcomes.
    assert "run-time table:" in show.stdout and "cluster runs at redis://127.0.0.1:" in show.stdout
    cluster_lines = [line.split() for line in show.stdout.split("cluster runs at")[1].splitlines()
                     if line.strip().split(" ")[0].isdigit()]
    assert len(cluster_lines) >= 5 * (last - first + 1)
    holders = {line[2] for line in cluster_lines}
    assert holders <= {"node-a", "node-b", "node-c"}, holders
    by_holder = Counter((r["job"], r["due"], r["node"]) for r in runs(nodes))
    for sec, name, holder, state, *_ in cluster_lines:
        if state == "done":
            assert by_holder[(name.split(".")[1], int(sec), holder)] == 1, (sec, name, holder)
    ran_a = {r["due"] for r in runs(nodes) if r["node"] == "node-a"}
    if len(ran_a) < last - first + 1:
        assert "ELSEWHERE" in show.stdout, show.stdout


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_twenty_rules_on_three_nodes_for_a_minute(servers: ServerRunner,
                                                  redis_server: RedisServer) -> None:
    # cron_cluster=True makes every rule once per cluster: the rules themselves are plain.
    nodes, first, last = run_three_nodes(servers, redis_server, 20, 60.0, cluster_flag=False,
                                         more=", cron_cluster=True")
    stop(nodes)
    per_node = assert_once(nodes, [f"r{i}" for i in range(20)], first, last)
    assert last - first >= 55
    # The races are won by whichever exec process asks first: over a minute, more than one.
    assert len(per_node) >= 2, per_node


@pytest.mark.timeout(90)
def test_a_lease_holder_killed_before_the_run_started(servers: ServerRunner,
                                                     redis_server: RedisServer) -> None:
    # node-a's only task worker sleeps, so a run it wins stays leased and unstarted until it
    # is killed; node-b takes it when the lease (cron_grace 6: 2 s) expires.
    a = servers.start(NODE_PRELUDE + '''
        @task("jobs")
        class Jobs:
            @scheduled(cron="* * * * * *", once_per_cluster=True)
            def tick(self):
                ran("tick")

        def block(server, wid):
            Task.deliver("Demo", "sleep", [120], Task.TYPE_ASYNC)
            emit(event="blocked")

        server = Server(worker_num=1, task_worker_num=1, cron=True, cluster=URL, node=NODE,
                        cron_grace=6)
        server.on("worker_start", block)
        sys.exit(server.start())
    ''', name="node_a.py", args=["node-a", redis_server.url])
    b = servers.start(NODE_PRELUDE + '''
        @task("jobs")
        class Jobs:
            @scheduled(cron="* * * * * *", once_per_cluster=True)
            def tick(self):
                ran("tick")

        sys.exit(Server(worker_num=1, task_worker_num=1, cron=True, cluster=URL, node=NODE,
                        cron_grace=6).start())
    ''', name="node_b.py", args=["node-b", redis_server.url])
    client = connect(redis_server.url)
    try:
        def won_by_a() -> int | None:
            for key in client.scan_iter(match="pyswtask:cron:jobs.tick:*"):
                if key.endswith(b":run"):
                    continue
                value = client.get(key)
                sec = int(key.rsplit(b":", 1)[1])
                # Won in its own second: node-a's older leases, won again after they expired,
                # may be too close to the end of the grace period for node-b to take over.
                if value and value.startswith(b"node-a#") and sec >= time.time() - 1 and \
                        not client.exists(key + b":run"):
                    return sec
            return None

        sec = wait_for(won_by_a, 30, interval=0.01)
        os.killpg(a.pid, signal.SIGKILL)
        killed_at = time.time()
        wait_for(lambda: client.hget(f"pyswtask:cron:jobs.tick:{sec}:run", "state") == b"done",
                 15)
        run = client.hgetall(f"pyswtask:cron:jobs.tick:{sec}:run")
        assert run[b"node"] == b"node-b" and client.get(
            f"pyswtask:cron:jobs.tick:{sec}").startswith(b"node-b#")
        time.sleep(1.5)
    finally:
        client.close()
    stop([b])
    a.wait(10)
    ticks = [r for r in runs([a, b]) if r["due"] == sec]
    assert len(ticks) == 1 and ticks[0]["node"] == "node-b", ticks
    # Taken over once the lease expired, within cron_grace.
    assert ticks[0]["t"] >= killed_at and ticks[0]["t"] - sec < 6, (ticks, killed_at)
    # Every second node-b saw came once (node-a ran nothing: its task worker slept).
    assert not [r for r in runs([a]) if r["job"] == "tick"]
    dues = sorted(r["due"] for r in runs([b]))
    assert len(dues) == len(set(dues)), dues


@pytest.mark.timeout(60)
def test_redis_unreachable_at_start_names_the_url(servers: ServerRunner) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    srv = servers.run(NODE_PRELUDE + '''
        from pyswtask import ClusterUnavailable

        @task("jobs")
        class Jobs:
            @scheduled(cron="* * * * * *", once_per_cluster=True)
            def tick(self):
                ran("tick")

        try:
            Server(worker_num=1, task_worker_num=1, cron=True, cluster=URL).start()
        except ClusterUnavailable as exc:
            emit(event="refused", text=str(exc))
        try:
            Server(worker_num=1, task_worker_num=1, cron=True).start()
        except ValueError as exc:
            emit(event="no_cluster", text=str(exc))
    ''', args=["node-a", url])
    (refused,) = srv.by_event("refused")
    assert refused["text"].startswith(f"cannot reach the cluster's Redis at {url}: "), refused
    (no_cluster,) = srv.by_event("no_cluster")
    assert no_cluster["text"] == ("once-per-cluster rules (jobs.tick) need the cluster setting: "
                                  "the Redis URL their leases are taken in")
    assert not srv.by_event("ran")


@pytest.mark.timeout(120)
def test_a_stalled_redis_delays_cluster_runs_within_the_grace(
        servers: ServerRunner, redis_server: RedisServer) -> None:
    # Two nodes, one once-per-cluster rule and one local rule; Redis SIGSTOPped for 3 s.
    body = '''
        @task("jobs")
        class Jobs:
            @scheduled(cron="* * * * * *", once_per_cluster=True)
            def shared(self):
                ran("shared")

            @scheduled(cron="* * * * * *")
            def local(self):
                ran("local")

        server = Server(worker_num=1, task_worker_num=2, cron=True, cluster=URL, node=NODE,
                        pid_file=NODE + ".pid")
        sys.exit(server.start())
    '''
    nodes = start_nodes(servers, redis_server, body, ["node-a", "node-b"])
    wait_going(nodes)
    first = int(time.time()) + 1
    time.sleep(1.0)
    redis_server.pause()
    paused = time.time()
    time.sleep(3.0)
    redis_server.resume()
    resumed = time.time()
    time.sleep(5.0)
    # A loaded machine can make a 1 s command time out now and then: margin at the end.
    last = int(time.time()) - 4
    stop(nodes)
    assert_once(nodes, ["shared"], first, last)
    # Due while Redis was stopped: run after it answered again, late but once.
    stalled = [r for r in runs(nodes) if r["job"] == "shared" and paused + 0.5 < r["due"]
               < resumed - 1.0]
    assert len(stalled) >= 1 and all(r["t"] >= resumed - 0.05 for r in stalled), stalled
    err = "".join(n.err for n in nodes)
    assert "once-per-cluster runs wait" in err and "answers again" in err, err[-3000:]
    # The local rule ran on both nodes every second, delayed at most by the bounded timeout.
    for node in ("node-a", "node-b"):
        local = [r for r in runs(nodes) if r["job"] == "local" and r["node"] == node]
        dues = sorted(r["due"] for r in local)
        assert set(range(first, last + 1)) <= set(dues) and len(dues) == len(set(dues)), dues
        assert all(r["t"] - r["due"] < 5.0 for r in local), local


@pytest.mark.timeout(120)
def test_a_redis_stalled_past_the_grace_skips_and_logs(servers: ServerRunner,
                                                      redis_server: RedisServer) -> None:
    body = NODE_SERVER.replace("{rules}", rules(1).strip()).replace("{more}", ", cron_grace=2")
    nodes = start_nodes(servers, redis_server, body, ["node-a", "node-b"])
    wait_going(nodes)
    redis_server.pause()
    paused = time.time()
    time.sleep(6.0)
    redis_server.resume()
    resumed = time.time()
    time.sleep(3.0)
    stop(nodes)
    seen = Counter(r["due"] for r in runs(nodes))
    assert all(n == 1 for n in seen.values()), seen
    # Due more than the grace before Redis came back: nobody ran them, both nodes said so.
    dropped = range(int(paused) + 1, int(resumed) - 2)
    assert not [sec for sec in dropped if sec in seen], (paused, seen)
    for node in nodes:
        assert "skipped: the cluster's Redis did not answer within cron_grace (2 s)" in node.err, node.err


def test_the_lease_protocol_on_a_real_redis(redis_server: RedisServer) -> None:
    from pyswtask.cron.lease import ClusterLeases, lease_seconds, recent_runs

    assert (lease_seconds(0), lease_seconds(6), lease_seconds(60)) == (1.0, 2.0, 5.0)
    a, b = ClusterLeases(redis_server.url, "a", 3), ClusterLeases(redis_server.url, "b", 3)
    va, vb = a.new_value(), b.new_value()
    assert va.startswith("a#") and va != a.new_value()
    # Both race for second 100: the first SET NX wins, the other learns who holds it.
    (won,) = a.race([("jobs.t", 100, va)])
    (lost,) = b.race([("jobs.t", 100, vb)])
    assert won == (va, None) and lost == (va, None)
    # The loser cannot start it; the winner can, once, and a lost reply retried is no harm.
    assert b.start("jobs.t", 100, vb) == va
    assert a.start("jobs.t", 100, va) is None and a.start("jobs.t", 100, va) is None
    (seen,) = b.race([("jobs.t", 100, vb)])
    assert seen == (va, va)
    a.finish("jobs.t", 100, "done", 0.25)
    client = connect(redis_server.url)
    try:
        # Started: both keys outlive the grace period (sec 100 is long past: KEEP from now).
        assert client.pttl("pyswtask:cron:jobs.t:100") > 60_000
        assert client.hget("pyswtask:cron:jobs.t:100:run", "state") == b"done"
        # A lease that expires unstarted is taken by the next racer; the old holder's
        # delivery, coming late to start, is refused.
        va2 = a.new_value()
        assert a.race([("jobs.t", 101, va2)])[0].holder == va2
        client.pexpire("pyswtask:cron:jobs.t:101", 1)
        time.sleep(0.05)
        vb2 = b.new_value()
        assert b.race([("jobs.t", 101, vb2)])[0].holder == vb2
        assert a.start("jobs.t", 101, va2) == vb2
        assert b.start("jobs.t", 101, vb2) is None
        # Expired with nobody holding it: the delivered attempt may still start.
        va3 = a.new_value()
        a.race([("jobs.t", 102, va3)])
        client.delete("pyswtask:cron:jobs.t:102")
        assert a.start("jobs.t", 102, va3) is None
        runs = {(r["sec"], r["holder"], r["state"]) for r in recent_runs(client)}
        assert runs == {(100, "a", "done"), (101, "b", "running"), (102, "a", "running")}
    finally:
        client.close()
        a.close()
        b.close()
    # Unreachable: ClusterUnavailable naming the URL, after one bounded timeout.
    gone = ClusterLeases(f"redis://127.0.0.1:{free_port()}/0", "a", 3)
    with pytest.raises(ClusterUnavailable, match="did not answer"):
        gone.race([("jobs.t", 100, gone.new_value())])
