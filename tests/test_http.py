"""Workers that serve HTTP: real servers on 127.0.0.1 with a port the kernel picks, real clients.

Each server script gets the test app below (``APP``): its handlers deliver tasks with
``await Task.co``, ``Task.co_batch`` and ASYNC callbacks, hold requests in flight, report the
worker's pid, and try the blocking delivery that must be refused. Lines the server prints are
read while it runs (``Live``), so a test can act on them: the address, lifespan events, the
pids of the task workers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from _testbase import ServerProcess, ServerRunner

pytest.importorskip("uvicorn", reason="serving HTTP needs uvicorn: pip install -e '.[http,test]'")
httpx = pytest.importorskip("httpx", reason="the HTTP tests' client: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parent.parent

APP = '''
from pyswtask import TaskTimeout, TaskWorkerLost

@task()
class Slow:
    def run(self, seconds, value):
        emit(event="task_running", pid=os.getpid())
        time.sleep(seconds)
        return value

async def reply(send, status, payload):
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})

async def lifespan(receive, send):
    while True:
        message = await receive()
        phase = message["type"].split(".")[1]
        emit(event="lifespan", phase=phase, pid=os.getpid())
        await send({"type": f"lifespan.{phase}.complete"})
        if phase == "shutdown":
            return

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    path, query = scope["path"], scope["query_string"].decode()
    if path == "/echo":
        await reply(send, 200, {"echo": await Task.co("Demo", "echo", [query]), "pid": os.getpid()})
    elif path == "/batch":
        outcomes = await Task.co_batch([("Demo", "echo", [i]) for i in range(int(query))])
        await reply(send, 200, outcomes)
    elif path == "/async":
        done = asyncio.get_running_loop().create_future()
        Task.deliver("Demo", "echo", [query], Task.TYPE_ASYNC,
                     callback=lambda task_id, result: done.set_result(result))
        await reply(send, 200, await done)
    elif path == "/hold":
        emit(event="holding", pid=os.getpid())
        await asyncio.sleep(float(query))
        await reply(send, 200, "held")
    elif path == "/slow_task":
        value = await Task.co("Slow", "run", [float(query), "done"], timeout=30, dst_worker_id=0)
        await reply(send, 200, value)
    elif scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            echoed = await Task.co("Demo", "echo", [message["text"]])
            await send({"type": "websocket.send", "text": f"{echoed} from {os.getpid()}"})
    elif path == "/pid":
        await reply(send, 200, os.getpid())
    elif path == "/stream":
        # A head, then the body's parts turns and a pause later.
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await asyncio.sleep(float(query))
        for part in (b"one,", b"two,", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b""})
    elif path == "/blocking":
        try:
            Task.deliver("Demo", "echo", [1])
        except DeliveryError as exc:
            return await reply(send, 200, str(exc))
        await reply(send, 200, "not refused")
    elif path == "/from_thread":
        try:
            await asyncio.to_thread(Task.deliver, "Demo", "echo", [1], Task.TYPE_ASYNC)
        except DeliveryError as exc:
            return await reply(send, 200, str(exc))
        await reply(send, 200, "not refused")
    elif path == "/blocking_batch":
        try:
            Task.deliver_batch([("Demo", "echo", [1])])
        except DeliveryError as exc:
            return await reply(send, 200, str(exc))
        await reply(send, 200, "not refused")
    elif path == "/failed_task":
        # A task's failure raised by the handler: before its response began, or after.
        if query == "timeout":
            raise TaskTimeout.after("task Slow.run", 1.5)
        if query == "after_start":
            await send({"type": "http.response.start", "status": 200, "headers": []})
        raise TaskWorkerLost.lost("the task worker went down")
    else:
        await reply(send, 404, "not found")
'''


def serve_body(server_args: str, extra: str = "", setup: str = "") -> str:
    return APP + extra + f'''
server = Server({server_args}, app=app)
{setup}server.on("start", lambda s: emit(event="listening", addresses=s.addresses))
server.on("task_worker_start", lambda s, wid: emit(event="task_worker", wid=wid, pid=os.getpid()))
sys.exit(server.start())
'''


class Live:
    """A running server whose output is read as it comes, by two threads."""

    def __init__(self, srv: ServerProcess) -> None:
        self.srv = srv
        self.lines: list[str] = []
        self.err_lines: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(stream, sink), daemon=True)
                        for stream, sink in ((srv.proc.stdout, self.lines),
                                             (srv.proc.stderr, self.err_lines))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream: Any, sink: list[str]) -> None:
        try:
            for line in stream:
                sink.append(line)
        except (ValueError, OSError):
            pass  # the stream was closed at teardown

    def records(self, event: str) -> list[dict[str, Any]]:
        return [r for r in (json.loads(line) for line in list(self.lines)
                            if line.startswith("{")) if r.get("event") == event]

    def wait_records(self, event: str, count: int = 1, timeout: float = 20.0,
                     where: Callable[[dict[str, Any]], bool] = lambda r: True) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.records(event) if where(r)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline or self.srv.proc.poll() is not None:
                raise AssertionError(f"{count} {event!r} record(s) not seen within {timeout} s; "
                                     f"got {found}\nstderr:\n{self.stderr()}")
            time.sleep(0.02)

    def stderr(self) -> str:
        return "".join(self.err_lines[-60:])

    def base_url(self) -> str:
        return "http://" + self.wait_records("listening")[0]["addresses"][0]

    def port(self) -> int:
        return int(self.base_url().rsplit(":", 1)[1])

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM to the master; its exit code (a hang fails the test)."""
        os.kill(self.srv.pid, signal.SIGTERM)
        try:
            code = self.srv.proc.wait(timeout)
        except Exception:
            raise AssertionError(f"server did not stop within {timeout} s\n{self.stderr()}") \
                from None
        for reader in self.readers:
            reader.join(5)
        return code


def start(servers: ServerRunner, server_args: str, extra: str = "", setup: str = "") -> Live:
    return Live(servers.start(serve_body(server_args, extra, setup)))


def test_concurrent_requests_each_deliver_a_task(servers: ServerRunner) -> None:
    live = start(servers, "worker_num=2, task_worker_num=2, bind='127.0.0.1:0'")
    url = live.base_url()
    live.wait_records("lifespan", 2, where=lambda r: r["phase"] == "startup")
    with httpx.Client(base_url=url, timeout=20) as client, \
            concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: client.get(f"/echo?n{i}"), range(200)))
        assert [r.status_code for r in responses] == [200] * 200
        assert [r.json()["echo"] for r in responses] == [f"n{i}" for i in range(200)]
        assert client.get("/batch?5").json() == [0, 1, 2, 3, 4]
        assert client.get("/async?cb").json() == "cb"
        assert client.get("/nowhere").status_code == 404
    # Keep-alive and pipelining, as uvicorn provides them: two requests in one write.
    with socket.create_connection(("127.0.0.1", live.port()), timeout=10) as sock:
        sock.sendall(b"GET /echo?first HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"GET /echo?second HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        raw = _read_all(sock)
    assert raw.count(b"HTTP/1.1 200 OK") == 2, raw
    assert raw.index(b'"first"') < raw.index(b'"second"')
    assert live.stop() == 0, live.stderr()
    assert not live.srv.group_alive()


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_websockets_and_tasks_on_either_event_loop(servers: ServerRunner, event_loop: str) -> None:
    if event_loop == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop comes with the [http] extra")
    sync_client = pytest.importorskip("websockets.sync.client",
                                      reason="WebSockets need websockets (the [http] extra)")
    live = start(servers, f"worker_num=1, task_worker_num=1, bind='127.0.0.1:0', "
                          f"event_loop={event_loop!r}",
                 setup="server.on('worker_start', lambda s, wid: emit(event='loop', "
                       "name=type(asyncio.get_event_loop()).__module__))\n")
    url = live.base_url()
    assert live.wait_records("loop")[0]["name"].startswith(event_loop)
    assert httpx.get(f"{url}/echo?x", timeout=20).json()["echo"] == "x"
    with sync_client.connect(url.replace("http:", "ws:") + "/ws", open_timeout=20) as ws:
        pid = httpx.get(f"{url}/pid", timeout=20).json()
        for text in ("one", "two"):
            ws.send(text)
            assert ws.recv(timeout=20) == f"{text} from {pid}"
    assert live.stop() == 0, live.stderr()


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_streamed_head_leaves_before_its_body_and_the_body_is_whole(servers: ServerRunner,
                                                                      parser: str) -> None:
    # A response's writes are held until the end of their loop turn, never longer: the head of
    # a response whose body comes 1.5 s later reaches the client long before it.
    live = start(servers, f"worker_num=1, task_worker_num=1, bind='127.0.0.1:0', http={parser!r}")
    port = live.port()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        t0 = time.monotonic()
        sock.sendall(b"GET /stream?1.5 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            assert chunk, head
            head += chunk
        head_after = time.monotonic() - t0
        raw = head + _read_all(sock)
        body_after = time.monotonic() - t0
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw
    assert head_after < 1.0 <= 1.4 < body_after, (head_after, body_after)
    assert b"transfer-encoding: chunked" in raw.lower()
    assert raw.endswith(b"4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n"), raw
    assert live.stop() == 0, live.stderr()


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_turn_writer_holds_a_turns_writes_and_sends_them_at_its_end(event_loop: str) -> None:
    from pyswtask.http.turnwrites import FLUSH_AT, TurnWriter, _Turn

    if event_loop == "uvloop":
        uvloop = pytest.importorskip("uvloop", reason="uvloop comes with the [http] extra")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    ours, peer = socket.socketpair()
    peer.setblocking(False)

    def received() -> bytes:
        data = b""
        while True:
            try:
                chunk = peer.recv(1 << 20)
            except BlockingIOError:
                return data
            if not chunk:
                return data + b"<EOF>"
            data += chunk

    async def scenario() -> None:
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        writer = TurnWriter(transport, _Turn(loop))   # type: ignore[arg-type]
        # A head and a body in one turn: nothing leaves before the turn ends, then both, in order.
        writer.write(b"head|")
        time.sleep(0.05)       # the turn goes on, synchronously
        writer.write(b"body|")
        assert writer.get_write_buffer_size() == 10
        time.sleep(0.05)
        assert received() == b""
        await asyncio.sleep(0.05)
        assert received() == b"head|body|"
        # A head alone leaves at the end of its turn, even though no body follows.
        writer.write(b"head2|")
        await asyncio.sleep(0.05)
        assert received() == b"head2|"
        # A large write goes at once, with what was held before it.
        writer.write(b"small|")
        writer.write(b"x" * FLUSH_AT)
        time.sleep(0.05)
        assert received() == b"small|" + b"x" * FLUSH_AT
        # close sends what is held first; the peer then sees the end.
        writer.write(b"last")
        writer.close()
        await asyncio.sleep(0.05)
        assert received() == b"last<EOF>"

    try:
        loop.run_until_complete(asyncio.wait_for(scenario(), 20))
    finally:
        loop.close()
        peer.close()


def test_turn_writer_abort_drops_what_is_held() -> None:
    from pyswtask.http.turnwrites import TurnWriter, _Turn

    loop = asyncio.new_event_loop()
    ours, peer = socket.socketpair()

    async def scenario() -> bytes:
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        writer = TurnWriter(transport, _Turn(loop))   # type: ignore[arg-type]
        writer.write(b"never")
        writer.abort()
        await asyncio.sleep(0.05)
        peer.settimeout(5)
        return peer.recv(100)

    try:
        assert loop.run_until_complete(asyncio.wait_for(scenario(), 20)) == b""
    finally:
        loop.close()
        peer.close()


def test_lifespan_runs_once_per_worker_and_the_access_log(servers: ServerRunner) -> None:
    live = start(servers, "worker_num=2, task_worker_num=1, bind='127.0.0.1:0', access_log=True")
    starts = live.wait_records("lifespan", 2, where=lambda r: r["phase"] == "startup")
    assert httpx.get(live.base_url() + "/pid?logged", timeout=20).status_code == 200
    assert live.stop() == 0, live.stderr()
    # Through stdlib logging: the script's basicConfig prints uvicorn's access lines.
    assert 'uvicorn.access INFO 127.0.0.1' in live.stderr()
    assert '"GET /pid?logged HTTP/1.1" 200' in live.stderr()
    stops = live.records("lifespan")
    assert sorted(r["pid"] for r in starts) == sorted(
        r["pid"] for r in stops if r["phase"] == "shutdown")
    assert len({r["pid"] for r in starts}) == 2
    assert [r["phase"] for r in stops].count("startup") == 2


@pytest.mark.slow
def test_sigterm_lets_requests_in_flight_finish(servers: ServerRunner) -> None:
    live = start(servers, "worker_num=2, task_worker_num=2, bind='127.0.0.1:0', max_wait_time=8")
    url = live.base_url()
    live.wait_records("lifespan", 2, where=lambda r: r["phase"] == "startup")
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        held = [pool.submit(httpx.get, f"{url}/hold?1.5", timeout=30) for _ in range(8)]
        tasks = [pool.submit(httpx.get, f"{url}/slow_task?1.0", timeout=30) for _ in range(2)]
        live.wait_records("holding", 8)
        live.wait_records("task_running", 1)
        t0 = time.monotonic()
        os.kill(live.srv.pid, signal.SIGTERM)
        results = [f.result() for f in held + tasks]
    assert [(r.status_code, r.json()) for r in results] == [(200, "held")] * 8 + [(200, "done")] * 2
    assert live.srv.proc.wait(20) == 0, live.stderr()
    assert time.monotonic() - t0 < 10
    assert len(live.records("lifespan")) == 4, "each worker ran its lifespan shutdown"
    assert not live.srv.group_alive()


@pytest.mark.slow
@pytest.mark.parametrize("keep_alive", [False, True], ids=["new-connections", "keep-alive"])
def test_reload_under_load_fails_no_request(servers: ServerRunner, keep_alive: bool) -> None:
    live = start(servers, "worker_num=2, task_worker_num=2, bind='127.0.0.1:0'")
    url = live.base_url()
    first = live.wait_records("lifespan", 2, where=lambda r: r["phase"] == "startup")
    stop = threading.Event()
    outcomes: list[Any] = []

    def load() -> None:
        # Fresh connections cross the listening socket while workers stop and start; kept-alive
        # ones are closed under their clients by the workers that stop.
        limits = httpx.Limits(max_keepalive_connections=5 if keep_alive else 0)
        with httpx.Client(base_url=url, timeout=20, limits=limits) as client:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    response = client.get(f"/echo?{i}")
                    ok = response.status_code == 200 and response.json()["echo"] == str(i)
                    outcomes.append(response.json()["pid"] if ok else f"bad {response.text}")
                except Exception as exc:
                    outcomes.append(f"failed {exc!r}")

    clients = [threading.Thread(target=load) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(0.5)
        for round_ in (1, 2):
            os.kill(live.srv.pid, signal.SIGUSR1)
            live.wait_records("lifespan", 2 + 2 * round_, timeout=30,
                              where=lambda r: r["phase"] == "startup")
        # The last successor must have served before the load stops.
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in clients:
            thread.join(30)
    failures = [o for o in outcomes if isinstance(o, str)]
    assert failures == [], failures[:5]
    assert len(outcomes) > 100
    startups = live.records("lifespan")
    new_pids = {r["pid"] for r in startups if r["phase"] == "startup"} - {r["pid"] for r in first}
    assert len(new_pids) == 4
    assert new_pids & set(outcomes), "the reloaded workers served"
    assert live.stop() == 0, live.stderr()


def test_a_request_whose_task_worker_dies_gets_a_500_at_once(servers: ServerRunner) -> None:
    live = start(servers, "worker_num=1, task_worker_num=2, bind='127.0.0.1:0'")
    url = live.base_url()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.get, f"{url}/slow_task?20", timeout=30)
        running = live.wait_records("task_running")[0]
        os.kill(running["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        response = pending.result()
        took = time.monotonic() - killed_at
    assert response.status_code == 500
    assert response.text == "500 Internal Server Error: TaskWorkerLost\n"
    print(f"the 500 came {took:.3f} s after the kill")
    assert took < 2.0, f"the 500 came {took:.2f} s after the kill"
    # The worker serves on, and the successor of the task worker runs tasks.
    live.wait_records("task_worker", 3)
    assert httpx.get(f"{url}/echo?after", timeout=20).json()["echo"] == "after"
    assert live.stop() == 0, live.stderr()


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_task_failure_before_the_response_is_answered_after_it_goes_to_uvicorn(
        servers: ServerRunner, parser: str) -> None:
    live = start(servers, f"worker_num=1, task_worker_num=1, bind='127.0.0.1:0', http={parser!r}")
    url = live.base_url()
    lost = httpx.get(f"{url}/failed_task?before_start", timeout=20)
    assert (lost.status_code, lost.text) == (500, "500 Internal Server Error: TaskWorkerLost\n")
    assert lost.headers["content-type"] == "text/plain; charset=utf-8"
    timed_out = httpx.get(f"{url}/failed_task?timeout", timeout=20)
    assert (timed_out.status_code, timed_out.text) == (504, "504 Gateway Timeout: TaskTimeout\n")
    # Once the response began, no second one: uvicorn logs the error and closes the connection.
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{url}/failed_task?after_start", timeout=20)
    assert httpx.get(f"{url}/pid", timeout=20).status_code == 200
    assert live.stop() == 0, live.stderr()
    errors = "".join(live.err_lines)
    assert "GET /failed_task: TaskWorkerLost: TaskWorkerLost: the task worker went down" in errors
    assert "GET /failed_task: TaskTimeout: task Slow.run gave no result within 1.5 s" in errors
    assert "Exception in ASGI application" in errors


def test_task_error_middleware_on_a_server_whose_send_cannot_tell() -> None:
    """Any ASGI server (or a framework's send): the middleware watches send itself."""
    import asyncio

    from pyswtask import TaskWorkerLost
    from pyswtask.http import TaskErrorMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/after":
            await send({"type": "http.response.start", "status": 200, "headers": []})
        raise TaskWorkerLost.lost("gone")

    async def call(path: str) -> list[Any]:
        sent: list[Any] = []

        async def send(message: Any) -> None:
            sent.append(message)

        await TaskErrorMiddleware(app)({"type": "http", "path": path, "method": "GET"},
                                       None, send)  # type: ignore[arg-type]
        return sent

    sent = asyncio.run(call("/before"))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 500
    assert sent[1]["body"] == b"500 Internal Server Error: TaskWorkerLost\n"
    with pytest.raises(TaskWorkerLost):
        asyncio.run(call("/after"))


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_malformed_request_gets_400_and_the_worker_serves_on(servers: ServerRunner,
                                                                  parser: str) -> None:
    live = start(servers, f"worker_num=1, task_worker_num=1, bind='127.0.0.1:0', http={parser!r}")
    port = live.port()
    pid = httpx.get(f"http://127.0.0.1:{port}/pid", timeout=20).json()
    for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n",
                    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64)):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(garbage)
            raw = _read_all(sock)
        assert raw.startswith(b"HTTP/1.1 400 "), (garbage, raw)
    assert httpx.get(f"http://127.0.0.1:{port}/pid", timeout=20).json() == pid
    assert live.stop() == 0, live.stderr()


def test_limit_concurrency_answers_503_not_a_hang(servers: ServerRunner) -> None:
    live = start(servers, "worker_num=1, task_worker_num=1, bind='127.0.0.1:0', "
                          "limit_concurrency=3")
    url = live.base_url()
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: httpx.get(f"{url}/hold?1.0", timeout=20), range(12)))
    took = time.monotonic() - t0
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503} and codes.count(200) <= 3, codes
    assert all(r.text == "Service Unavailable" for r in responses if r.status_code == 503)
    assert took < 10
    assert httpx.get(f"{url}/echo?ok", timeout=20).status_code == 200
    assert live.stop() == 0, live.stderr()


def test_blocking_delivery_in_an_async_handler_is_refused(servers: ServerRunner) -> None:
    live = start(servers, "worker_num=1, task_worker_num=1, bind='127.0.0.1:0'")
    url = live.base_url()
    single = httpx.get(f"{url}/blocking", timeout=20).json()
    batch = httpx.get(f"{url}/blocking_batch", timeout=20).json()
    assert single.startswith("Task.deliver (CO) blocks this worker's event loop")
    assert "use `await Task.co(...)`" in single
    assert "use `await Task.co_batch(...)`" in batch
    thread = httpx.get(f"{url}/from_thread", timeout=20).json()
    assert thread.startswith("Task.deliver works in the thread of the worker's event loop only")
    assert live.stop() == 0, live.stderr()


def test_timers_hooks_and_pipe_messages_keep_working_in_an_http_worker(
        servers: ServerRunner) -> None:
    live = start(servers, "worker_num=1, task_worker_num=1, bind='127.0.0.1:0'", extra='''
from pyswtask import process

state = {"ticks": 0, "messages": []}

def on_start(server, wid):
    server.tick(20, lambda timer_id: state.update(ticks=state["ticks"] + 1))
    # Blocking where blocking is the caller's choice: in a hook, outside any coroutine.
    state["from_hook"] = Task.deliver("Demo", "echo", ["hook"])

@listener(Event.PIPE_MESSAGE)
def on_message(event):
    if event.params[0] == "note":
        state["messages"].append(event.params[1])

@process(name="feeder")
def feeder(server, proc):
    result = Task.deliver_by_process("Demo", "echo", ["via worker"], type=Task.TYPE_CO)
    server.send_message({"relayed": result}, 0, type="note")
    proc.sleep(60)

inner = app

async def app(scope, receive, send):
    if scope.get("path") == "/state":
        return await reply(send, 200, state)
    await inner(scope, receive, send)
''', setup='server.on("worker_start", on_start)\n')
    url = live.base_url()

    def state() -> Any:
        got = httpx.get(f"{url}/state", timeout=20).json()
        return got if got["messages"] and got["ticks"] >= 5 else None

    got = _poll(state, 20)
    assert got["from_hook"] == "hook"
    assert got["messages"] == [{"relayed": "via worker"}]
    assert live.stop() == 0, live.stderr()


def _poll(predicate: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(0.05)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def cli_script(*args: str) -> str:
    # The project root on sys.path, as `pyswtask serve` run from the project root has it.
    return (f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom pyswtask.cli import main\n"
            f"sys.exit(main({list(args)!r}))\n")


def logged_url(live: Live, timeout: float = 30.0) -> str:
    """The first address the master logged it listens on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(live.err_lines):
            if " listening on http://" in line:
                return line.split(" listening on ", 1)[1].split(",")[0].strip()
        if live.srv.proc.poll() is not None:
            break
        time.sleep(0.02)
    raise AssertionError(f"the master did not log its address\n{live.stderr()}")


@pytest.mark.skipif(not (ROOT / "examples" / "fastapi_app.py").is_file(),
                    reason="no examples/ next to the tests")
def test_the_fastapi_example_served_by_the_cli(servers: ServerRunner) -> None:
    pytest.importorskip("fastapi", reason="the FastAPI example needs fastapi: pip install "
                        "-e '.[http,test]'")
    live = Live(servers.start(cli_script(
        "serve", "examples.fastapi_app:app", "--bind", "127.0.0.1:0", "--workers", "2",
        "--task-workers", "2"), prelude=False))
    url = logged_url(live)
    with httpx.Client(base_url=url, timeout=30) as client, \
            concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert client.get("/").json() == {"hello": "world"}
        counts = list(pool.map(lambda n: client.get(f"/primes?below={n}").json(),
                               [10, 100, 300_000, 1000]))
        assert [c["count"] for c in counts] == [4, 25, 25997, 168]
        assert client.get("/primes?below=x").status_code == 422
        slow = client.get("/primes?below=30000000&timeout=0.05")
        assert (slow.status_code, slow.text) == (504, "504 Gateway Timeout: TaskTimeout\n")
    assert live.stop() == 0, live.stderr()
    assert not live.srv.group_alive()


def test_serve_refuses_an_app_it_cannot_import(servers: ServerRunner) -> None:
    srv = servers.start(cli_script("serve", "no_such_module_here:app", "--bind", "127.0.0.1:0"),
                        prelude=False)
    assert srv.wait(30) == 1
    assert "setting app: cannot import module 'no_such_module_here'" in srv.err
    assert not srv.group_alive()


def test_a_unix_socket_and_a_tcp_port_at_once(servers: ServerRunner, tmp_path: Path) -> None:
    path = tmp_path / "http.sock"
    live = start(servers, f"worker_num=2, task_worker_num=1, bind=['127.0.0.1:0', "
                          f"'unix:{path}']")
    addresses = live.wait_records("listening")[0]["addresses"]
    assert addresses[1] == f"unix:{path}"
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), timeout=20) as client:
        assert client.get("http://local/echo?over-unix").json()["echo"] == "over-unix"
    assert httpx.get(f"http://{addresses[0]}/echo?over-tcp", timeout=20).json()["echo"] == "over-tcp"
    assert live.stop() == 0, live.stderr()
    assert not path.exists(), "the master removes the socket file it made"


def test_serve_imports_the_task_modules_before_the_fork(servers: ServerRunner,
                                                        tmp_path: Path) -> None:
    (tmp_path / "shouting.py").write_text(
        "from pyswtask import task\n\n@task()\nclass Shout:\n"
        "    def loud(self, text):\n        return text.upper()\n")
    (tmp_path / "web.py").write_text(
        "from pyswtask import Task\n\n"
        "async def app(scope, receive, send):\n"
        "    if scope['type'] != 'http':\n        return\n"
        "    body = (await Task.co('Shout', 'loud', [scope['path'][1:]])).encode()\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': body})\n")
    live = Live(servers.start(cli_script(
        "serve", "web:app", "--task-module", "shouting", "--bind", "127.0.0.1:0",
        "--workers", "1", "--task-workers", "1", "--max-wait-time", "2"), prelude=False))
    url = logged_url(live)
    assert httpx.get(f"{url}/quiet", timeout=20).text == "QUIET"
    assert live.stop() == 0, live.stderr()


def test_bind_addresses_are_parsed_or_refused_saying_why() -> None:
    from pyswtask.http import Bind, parse_binds

    assert parse_binds("127.0.0.1:0") == [Bind(host="127.0.0.1", port=0)]
    assert parse_binds(["[::1]:8000", "unix:/run/app.sock"]) == [
        Bind(host="::1", port=8000), Bind(path="/run/app.sock")]
    for bad, why in (("localhost", "neither host:port"), ("::1:80", "in brackets"),
                     ("h:65536", "0..65535"), ("unix:", "names no socket path"),
                     ([], "non-empty list")):
        with pytest.raises(ValueError, match=why):
            parse_binds(bad)  # type: ignore[arg-type]


def test_http_options_that_pyswtask_owns_or_uvicorn_lacks_are_refused() -> None:
    from pyswtask.http.embed import make_config
    from pyswtask.settings import validate

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    for options, why in (({"port": 1, "workers": 3}, "port, workers cannot be set there"),
                         ({"no_such_option": 1}, "no_such_option")):
        with pytest.raises(ValueError, match=f"setting http_options: .*{why}"):
            make_config(app, validate({"app": app, "http_options": options}))
