"""The demo server: workers deliver CO, ASYNC and batch tasks, a user process delivers through a
worker and sends a pipe message, and the crontab fires a job every two seconds. It prints what
happens and stops the server after a few seconds (or on Ctrl-C). With PYSWTASK_DEMO_QUEUE_KEY
set, separate programs can deliver through the server's message queue as well.

Run it with ``scripts/demo`` (or ``pyswtask run examples.demo:server`` in a set-up venv).
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime
from typing import Any

from pyswtask import (
    Event,
    EventObject,
    Process,
    Server,
    Task,
    TaskError,
    TaskTimeout,
    listener,
    process,
    scheduled,
    task,
)
from pyswtask.cron import due_second

RUN_SECONDS = float(os.environ.get("PYSWTASK_DEMO_SECONDS", "5"))


def say(who: str, text: str) -> None:
    print(f"[{who}] {text}", flush=True)


@task()
class Mailer:
    """A task class: its public methods run in task workers."""

    def send(self, to: str, subject: str) -> str:
        time.sleep(0.05)  # pretend to talk to an SMTP server
        done = f"sent {subject!r} to {to} from task worker pid {os.getpid()}"
        say("task worker", done)
        return done

    def fail(self) -> None:
        raise RuntimeError("the SMTP server said no")


@task("math")
class Maths:
    def add(self, a: int, b: int) -> int:
        return a + b

    async def slow_square(self, x: int) -> int:
        await asyncio.sleep(0.2)
        return x * x


@task()
class Reports:
    @scheduled(cron="*/2 * * * * *")   # seconds first: every even second
    def heartbeat(self) -> None:
        due = due_second.get() or 0
        late_ms = (time.time() - due) * 1000
        say("cron", f"heartbeat due at {datetime.fromtimestamp(due):%H:%M:%S}, "
                    f"started {late_ms:.1f} ms after it, in task worker pid {os.getpid()}")


@listener(Event.FINISH_TASK)
def on_finish(event: EventObject) -> None:
    task_id, result = event.params
    say(f"worker {server.worker_id}", f"ASYNC task {task_id} finished: {result}")


@listener(Event.PIPE_MESSAGE)
def on_pipe_message(event: EventObject) -> None:
    mtype, data, src = event.params
    if mtype == "greeting":
        say(f"worker {server.worker_id}", f"pipe message from process {src}: {data!r}")


@process(name="producer")
def producer(srv: Server, proc: Process) -> None:
    """A user process: it delivers through a worker (Swoft's deliverByProcess)."""
    result = Task.deliver_by_process("math", "add", [20, 22], type=Task.TYPE_CO)
    say("process producer", f"CO through worker 0: math.add(20, 22) -> {result}")

    def done(request_id: int, value: Any) -> None:
        say("process producer", f"ASYNC request {request_id} came back: {value}")

    Task.deliver_by_process("Mailer", "send", ["ceo@example.org", "report"], worker_id=-1,
                            callback=done)
    srv.send_message("hello from a user process", 0, type="greeting")
    proc.sleep(3600)   # handles its messages (and the callback above) while it waits


def on_worker_start(srv: Server, worker_id: int) -> None:
    me = f"worker {worker_id}"
    say(me, f"started (pid {os.getpid()})")
    if worker_id == 0:
        say(me, "CO   math.add(2, 3) -> " + repr(Task.deliver("math", "add", [2, 3])))
        try:
            Task.deliver("Mailer", "fail")
        except TaskError as exc:
            say(me, f"CO   Mailer.fail raised remotely -> {exc}")
        try:
            Task.deliver("math", "slow_square", [7], timeout=0.05)
        except TaskTimeout as exc:
            say(me, f"CO   timed out as asked -> {exc}")
        say(me, f"BATCH math.add x5 -> {Task.deliver_batch([('math', 'add', [i, i]) for i in range(5)])}")
        srv.after(int(RUN_SECONDS * 1000), srv.shutdown)
    else:
        task_id = Task.deliver("Mailer", "send", ["ops@example.org", "hello"], Task.TYPE_ASYNC)
        say(me, f"ASYNC Mailer.send delivered as task {task_id}")
        srv.after(1000, lambda: asyncio.get_running_loop().create_task(square(worker_id)))


async def square(worker_id: int) -> None:
    value = await Task.co("math", "slow_square", [worker_id + 4])
    say(f"worker {worker_id}", f"await Task.co math.slow_square -> {value}")


# scripts/demo sets a queue key, so that a separate program can deliver too (pyswtask deliver).
server = Server(worker_num=2, task_worker_num=2, cron=True,
                message_queue_key=os.environ.get("PYSWTASK_DEMO_QUEUE_KEY"))
server.on("worker_start", on_worker_start)
server.on("shutdown", lambda srv: say("master", "all processes stopped"))
