"""The demo server: two workers deliver CO, ASYNC and batch tasks to two task workers, print
what happens, and stop the server after a few seconds (or on Ctrl-C).

Run it with ``scripts/demo`` (or ``pyswtask run examples.demo:server`` in a set-up venv).
"""

from __future__ import annotations

import asyncio
import os
import time

from pyswtask import Event, EventObject, Server, Task, TaskError, TaskTimeout, listener, task

RUN_SECONDS = float(os.environ.get("PYSWTASK_DEMO_SECONDS", "4"))


@task()
class Mailer:
    """A task class: its public methods run in task workers."""

    def send(self, to: str, subject: str) -> str:
        time.sleep(0.05)  # pretend to talk to an SMTP server
        return f"sent {subject!r} to {to} from task worker pid {os.getpid()}"

    def fail(self) -> None:
        raise RuntimeError("the SMTP server said no")


@task("math")
class Maths:
    def add(self, a: int, b: int) -> int:
        return a + b

    async def slow_square(self, x: int) -> int:
        await asyncio.sleep(0.2)
        return x * x


def say(worker_id: int, text: str) -> None:
    print(f"[worker {worker_id}] {text}", flush=True)


@listener(Event.FINISH_TASK)
def on_finish(event: EventObject) -> None:
    task_id, result = event.params
    say(server.worker_id, f"ASYNC task {task_id} finished: {result}")


def on_worker_start(srv: Server, worker_id: int) -> None:
    say(worker_id, f"started (pid {os.getpid()})")
    if worker_id == 0:
        say(0, "CO   math.add(2, 3) -> " + repr(Task.deliver("math", "add", [2, 3])))
        try:
            Task.deliver("Mailer", "fail")
        except TaskError as exc:
            say(0, f"CO   Mailer.fail raised remotely -> {exc}")
        try:
            Task.deliver("math", "slow_square", [7], timeout=0.05)
        except TaskTimeout as exc:
            say(0, f"CO   timed out as asked -> {exc}")
        batch = Task.deliver_batch([("math", "add", [i, i]) for i in range(5)])
        say(0, f"BATCH math.add x5 -> {batch}")
        srv.after(int(RUN_SECONDS * 1000), srv.shutdown)
    else:
        task_id = Task.deliver("Mailer", "send", ["ops@example.org", "hello"], Task.TYPE_ASYNC)
        say(worker_id, f"ASYNC Mailer.send delivered as task {task_id}")
        srv.tick(1000, lambda timer_id: tick(worker_id))


def tick(worker_id: int) -> None:
    async def square() -> None:
        value = await Task.co("math", "slow_square", [worker_id + 4])
        say(worker_id, f"tick: await Task.co math.slow_square -> {value}")

    asyncio.get_running_loop().create_task(square())


server = Server(worker_num=2, task_worker_num=2)
server.on("worker_start", on_worker_start)
server.on("shutdown", lambda srv: print("[master] all processes stopped", flush=True))
