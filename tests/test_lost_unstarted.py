"""A task read but not started when its task worker dies should go to the successor.

Known bug, reproduced here (README, "Crashes": "Tasks it had read but not started are sent to
its successor again"): worker 0 delivers three ASYNC tasks to task worker 0 in one loop turn;
the first returns a 20 MB result and its task worker is SIGKILLed 5 ms later, while that result
is being packed and sent. The second task never starts (no BEFORE_TASK anywhere) yet fails with
TaskWorkerLost; the third is run by the successor. Nothing runs twice and the loss is reported,
so at-most-once holds, but the task was not sent again. Found by perf/soak.py (a CO task lost
with never a start). Not strict: the kill must land in that window, which it does here nearly
always, not surely.
"""

from __future__ import annotations

import pytest
from _testbase import ServerRunner


@pytest.mark.xfail(strict=False, reason="a read, unstarted task of a dying task worker fails "
                   "with TaskWorkerLost instead of going to its successor")
def test_a_task_read_but_not_started_runs_on_the_successor(servers: ServerRunner) -> None:
    srv = servers.run('''
        import signal, threading

        @task()
        class Gap:
            def big(self):
                result = [1] * 20_000_000
                if os.environ.get("GAP_ARMED") is None:
                    os.environ["GAP_ARMED"] = "1"
                    threading.Timer(0.005, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
                return result

            def mark(self, i):
                return i

        @listener(Event.BEFORE_TASK)
        def started(event):
            emit(event="started", method=event.params[1], params=event.params[2])

        def start(server, wid):
            out = {}

            def done(name, result):
                out[name] = type(result).__name__ if isinstance(result, Exception) else (
                    len(result) if isinstance(result, list) else result)
                if len(out) == 3:
                    emit(event="results", **out)
                    server.shutdown()

            for name, method, params in (("big", "big", []), ("mark1", "mark", [1]),
                                         ("mark2", "mark", [2])):
                Task.deliver("Gap", method, params, Task.TYPE_ASYNC, dst_worker_id=0, timeout=30,
                             callback=lambda t, r, name=name: done(name, r))

        server = Server(worker_num=1, task_worker_num=1)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''', timeout=60)
    results = srv.by_event("results")[0]
    started = [r["params"] for r in srv.by_event("started") if r["method"] == "mark"]
    assert results["big"] == "TaskWorkerLost"
    assert results["mark2"] == 2 and started.count([2]) == 1
    # Read but never started: it must run on the successor, once.
    assert started.count([1]) == 1 and results["mark1"] == 1, (results, started)
