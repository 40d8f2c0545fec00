"""A FastAPI app whose endpoint runs a CPU-heavy task in a task worker and returns its result.

    pip install 'pyswtask[http]'
    pyswtask serve examples.fastapi_app:app --bind 127.0.0.1:8000 --workers 2 --task-workers 2
    curl 'http://127.0.0.1:8000/primes?below=300000'      # {"below":300000,"count":25997}

The sieve runs in a task worker, so the worker that took the request keeps serving others while
it runs (``await Task.co``). A request whose task worker dies gets a 500 naming TaskWorkerLost at
once (``TaskErrorMiddleware``), one whose task is too slow a 504 naming TaskTimeout.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from pyswtask import Server, Task, task
from pyswtask.http import TaskErrorMiddleware


@task()
class Primes:
    def count(self, below: int) -> int:
        """How many primes are below ``below`` (a sieve of Eratosthenes: CPU work)."""
        if below < 3:
            return 0
        sieve = bytearray([1]) * below
        sieve[0] = sieve[1] = 0
        for n in range(2, int(below ** 0.5) + 1):
            if sieve[n]:
                sieve[n * n::n] = bytes(len(range(n * n, below, n)))
        return sum(sieve)


app = FastAPI(title="pyswtask + FastAPI")
# Inside FastAPI: its own error handling would turn the task's failure into a bare 500 first.
app.add_middleware(TaskErrorMiddleware)


@app.get("/")
async def hello() -> dict[str, str]:
    return {"hello": "world"}


@app.get("/primes")
async def primes(below: int = 100_000, timeout: float = 10.0) -> dict[str, int]:
    count = await Task.co("Primes", "count", [below], timeout=timeout)
    return {"below": below, "count": count, "worker_pid": os.getpid()}


if __name__ == "__main__":
    Server(worker_num=2, task_worker_num=2, app=app, bind="127.0.0.1:8000").start()
