"""A burst of ASYNC tasks delivered in one loop turn, with a small task_queue_size.

Backpressure (Dispatcher._wait_for_room) bounds the tasks waiting for a result, and runs the
finish callbacks of the results it read while waiting: otherwise a burst in one loop turn keeps
every result (about 290 bytes each) until the turn ends. perf/bench_burst.py measures the RSS.
"""

from __future__ import annotations

from _testbase import ServerRunner

N = 200_000


def test_a_one_turn_burst_runs_finish_callbacks_as_it_waits(servers: ServerRunner) -> None:
    srv = servers.run(f'''
        from pyswtask import roles

        def start(server, wid):
            state = {{"done": 0}}
            dispatcher = roles.current().dispatcher

            def finished(task_id, result):
                state["done"] += 1
                if state["done"] == {N}:
                    server.shutdown()

            peak = 0
            for _ in range({N}):
                Task.deliver("Demo", "echo", [1, "abc", 3.5], Task.TYPE_ASYNC, callback=finished)
                peak = max(peak, dispatcher.pending_count)
            # Still inside the same loop turn: only the last task_queue_size may be unfinished.
            emit(done_in_turn=state["done"], peak=peak)

        server = Server(worker_num=1, task_worker_num=2, task_queue_size=1000)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''', timeout=60)
    row = srv.records()[0]
    assert row["peak"] <= 1000
    assert row["done_in_turn"] >= N - 1000, row
