"""Server settings: each one's name, default, check and one-line doc, declared once.

Owns the declarations (``SETTINGS``), the defaults (``DEFAULTS``) and ``validate``, which turns
the keyword settings given to ``Server`` into the complete, normalized dict that every process
of the server reads. The README's settings table repeats the names, defaults and docs, and
tests/test_settings.py keeps it equal to them.

Must not import ``pyswtask.server`` (which imports this), nor, at import time, the modules
whose helpers the checks call (``cron.zone``, ``transport.msgqueue.parse_key`` / ``IPC_MODES``): they are
imported inside the check, so that any module may read the declarations without a cycle.
Must not hold behaviour: what a setting does lives with the code that reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable

__all__ = ["Setting", "SETTINGS", "DEFAULTS", "validate"]

# A check gets the setting's name (for its message) and the value given; it returns the value
# to use, possibly normalized, or raises ValueError naming the setting.
Check = Callable[[str, Any], Any]


def _plain(value: Any) -> str:
    # Decimal keeps a small float readable in the README (0.00003, not 3e-05).
    if isinstance(value, float):
        return format(Decimal(repr(value)), "f")
    return repr(value)


def _mib(value: int) -> str:
    return f"{value >> 20} MiB" if value and value % (1 << 20) == 0 else repr(value)


@dataclass(frozen=True)
class Setting:
    """One server setting: ``check`` is None for a setting taken as given."""

    name: str
    default: Any
    check: Check | None
    doc: str
    show: Callable[[Any], str] = _plain

    def default_text(self) -> str:
        """The default as the README's settings table shows it."""
        return self.show(self.default)


# -- checks ---------------------------------------------------------------------------------
# Bools pass the number checks (True is 1), as they always did; the int checks refuse them.

def _non_negative_number(name: str, value: Any) -> Any:
    if not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"setting {name} must be a non-negative number, not {value!r}")
    return value


def _seconds(name: str, value: Any) -> Any:
    if not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"setting {name} must be a non-negative number of seconds, not {value!r}")
    return value


def _non_negative_int(name: str, value: Any) -> Any:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"setting {name} must be a non-negative int, not {value!r}")
    return value


def _positive_int(name: str, value: Any) -> Any:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"setting {name} must be a positive int, not {value!r}")
    return value


def _capacity(name: str, value: Any) -> Any:
    # Table rows are counted in 32-bit fields of the shared-memory header.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31:
        raise ValueError(f"setting {name} must be a positive int, not {value!r}")
    return value


def _bool(name: str, value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError(f"setting {name} must be True or False, not {value!r}")
    return value


def _timezone(name: str, value: Any) -> Any:
    from .cron import zone

    # The name is kept, not the zone: every process resolves it again after the fork.
    zone(value)
    return value


def _shm_key(name: str, value: Any) -> Any:
    # Below 2**31 - 1: the run-time table takes the next key.
    if value is not None and (not isinstance(value, int) or not 0 < value < 2**31 - 1):
        raise ValueError(f"setting {name} must be a positive int, not {value!r}")
    return value


def _ipc_mode(name: str, value: Any) -> Any:
    from .transport.msgqueue import IPC_MODES

    if value not in IPC_MODES or isinstance(value, bool):
        raise ValueError(f"setting {name} must be 1 (unix sockets), 2 (message queue) or 3 "
                         f"(message queue, contention), not {value!r}")
    return value


def _queue_key(name: str, value: Any) -> Any:
    from .transport.msgqueue import parse_key

    return None if value is None else parse_key(value, f"setting {name}")


def _queue_size(name: str, value: Any) -> Any:
    _non_negative_int(name, value)
    if value < 1:
        raise ValueError(f"setting {name} must be at least 1")
    return value


def _app(name: str, value: Any) -> Any:
    # Imported at start, in the master: here only its shape is checked.
    if value is None or callable(value):
        return value
    if not isinstance(value, str) or not all(value.partition(":")[::2]):
        raise ValueError(f"setting {name} must be \"module:attribute\" or an ASGI app, not {value!r}")
    return value


def _bind(name: str, value: Any) -> Any:
    from .http.listeners import parse_binds

    try:
        parse_binds(value)
    except ValueError as exc:
        raise ValueError(f"setting {name}: {exc}") from None
    return value if isinstance(value, str) else list(value)


def _metrics_bind(name: str, value: Any) -> Any:
    if value is None:
        return None
    host, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"setting {name} must be \"host:port\" (port 0: the kernel picks) or "
                         f"None, not {value!r}")
    import importlib.util

    if importlib.util.find_spec("prometheus_client") is None:
        raise ValueError(f"setting {name}: prometheus-client is not installed "
                         "(pip install 'pyswtask[metrics]')")
    return value


def _optional_positive_int(name: str, value: Any) -> Any:
    return None if value is None else _positive_int(name, value)


def _http(name: str, value: Any) -> Any:
    if value not in ("auto", "httptools", "h11"):
        raise ValueError(f"setting {name} must be \"auto\", \"httptools\" or \"h11\", not {value!r}")
    return value


def _event_loop(name: str, value: Any) -> Any:
    import importlib.util

    if value not in ("asyncio", "uvloop"):
        raise ValueError(f"setting {name} must be \"asyncio\" or \"uvloop\", not {value!r}")
    if value == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ValueError(f"setting {name}: uvloop is not installed (pip install 'pyswtask[http]')")
    return value


def _options(name: str, value: Any) -> Any:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"setting {name} must be a dict of keyword arguments, not {value!r}")
    return dict(value)


def _cluster_url(name: str, value: Any) -> Any:
    from .cluster.connection import check_url

    return None if value is None else check_url(value, f"setting {name}")


def _optional_str(name: str, value: Any) -> Any:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"setting {name} must be a non-empty string, not {value!r}")
    return value


def _queue_names(name: str, value: Any) -> Any:
    if value is None:
        return None
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"setting {name} must be a queue name or a list of them, not {value!r}")
    return list(names)


def _positive_seconds(name: str, value: Any) -> Any:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"setting {name} must be a positive number of seconds, not {value!r}")
    return value


# -- the declarations, in the order they are checked ------------------------------------------

SETTINGS: tuple[Setting, ...] = (
    Setting("max_wait_time", 3.0, _non_negative_number,
            "seconds in-flight tasks get to finish when the server stops"),
    # A result that comes within the spin saves waking a sleeping process: about 8 us of a 23 us
    # round trip across CPUs on one machine, two thirds of a 100 us one on a VM whose wake-ups
    # across CPUs cost some 40 us each. The adaptive rule bounds what it can waste. The task
    # workers' side (at most 1 ms) saves the other wake-up of a program's CO round trip.
    Setting("task_wait_spin", 0.0002, _non_negative_number,
            "seconds a CO caller polls for its result before sleeping (adaptive: skipped while "
            "round trips average more than twice this; 0 turns it off); with task_ipc_mode 2 "
            "or 3, also how long a task worker polls the message queue after answering a "
            "separate program's CO task, when it answered one within twice this before"),
    # Not checked: opening it at start fails on a path that cannot be written.
    Setting("pid_file", None, None, "write the master's pid here while it runs"),
    Setting("respawn_backoff_max", 5.0, _non_negative_number,
            "longest pause before respawning a child that keeps dying at start"),
    Setting("cron", False, _bool, "run the crontab (`@scheduled` methods)"),
    Setting("timezone", None, _timezone,
            "IANA zone the cron rules are read in; None: the machine's local time"),
    Setting("cron_task_capacity", 1024, _capacity,
            "rows of the origin table (scheduled methods); too small fails the start"),
    Setting("cron_run_capacity", 8192, _capacity,
            "rows of the run-time table (due runs); when full, runs are logged and counted as "
            "dropped"),
    Setting("cron_grace", 60, _seconds, "seconds a late run may still be delivered"),
    Setting("cron_shm_key", None, _shm_key,
            "SysV key of the origin table (the run-time table's is one more); None: derived "
            "from the master's pid"),
    Setting("stats_shm_key", None, _shm_key,
            "SysV key of the stats segment (`server.stats()`, `pyswtask status`, metrics); "
            "None: derived from the master's pid"),
    # Served by a thread of the master, from the stats segment at each scrape.
    Setting("metrics_bind", None, _metrics_bind,
            "`\"host:port\"` where the master serves Prometheus `/metrics` (needs "
            "`pyswtask[metrics]`; port 0: the kernel picks, `server.metrics_address` tells); "
            "None: no metrics"),
    # As in Swoole; separate programs deliver through the queue in every mode.
    Setting("task_ipc_mode", 1, _ipc_mode,
            "workers -> task workers: 1 unix sockets, 2 message queue by type, 3 message queue "
            "in contention"),
    # Without a key, modes 2 and 3 use a private queue, which separate programs cannot reach.
    Setting("message_queue_key", None, _queue_key,
            "SysV key (int or `\"0x...\"`) of the queue separate programs deliver through; "
            "None: none (modes 2/3 use a private queue)"),
    # Swoole's task_max_request: the task worker stops at the limit, exits, and a fresh one takes
    # its place, running first the rest of the record the old one stopped in (TaskLoop).
    Setting("task_max_request", 0, _non_negative_int,
            "recycle a task worker after this many tasks (0: never)"),
    # Swoole's task_enable_coroutine: the task worker's asyncio loop runs between its tasks
    # (roles/slices.py), and an async def task method becomes one of its coroutines.
    Setting("task_enable_coroutine", False, _bool,
            "a task worker runs `async def` task methods concurrently on its own event loop "
            "(sync methods still one at a time)"),
    Setting("task_max_concurrency", 100, _positive_int,
            "with `task_enable_coroutine`: async tasks a task worker runs at once; more wait, "
            "unread, in the channels"),
    Setting("max_request", 0, _non_negative_int,
            "recycle a worker after it delivered this many tasks (0: never)"),
    # Backpressure: a worker that waits for room reads results meanwhile.
    Setting("task_queue_size", 65536, _queue_size,
            "tasks a worker may have waiting for results before delivery waits"),
    Setting("package_max_length", 64 << 20, _positive_int,
            "largest packed params, result or pipe message (`ValueError` naming the setting "
            "above it); readers drop a longer body as it is reassembled", show=_mib),
    # Per channel and direction: 2 x worker_num x task_worker_num of them, address space only
    # until used; each takes the memory of the most bodies it held at once (see core/arena.pyx).
    Setting("task_arena_size", 64 << 20, _non_negative_int,
            "shared memory each channel has per direction for task and result bodies of 16 KiB "
            "and more, which then cross by reference; a body that finds no room goes through "
            "the socket; 0: every body does", show=_mib),
    # Serving HTTP: the master imports the app and listens before it forks; each worker runs
    # uvicorn on its own event loop, on the inherited sockets.
    Setting("app", None, _app,
            "ASGI app the workers serve: `\"module:attribute\"` or the app; None: no HTTP"),
    Setting("bind", "127.0.0.1:8000", _bind,
            "where the workers accept HTTP: `\"host:port\"` (port 0: the kernel picks; "
            "`server.addresses` tells), `\"unix:/path\"`, or a list of them"),
    Setting("backlog", 2048, _positive_int, "listen backlog of each bound socket"),
    Setting("limit_concurrency", None, _optional_positive_int,
            "connections or requests a worker serves at once; beyond it, 503 (uvicorn's); None: "
            "no limit"),
    Setting("access_log", False, _bool,
            "log each request to the `uvicorn.access` logger (stdlib logging)"),
    Setting("http", "auto", _http,
            "HTTP/1.1 parser: `\"httptools\"`, `\"h11\"`, or `\"auto\"` (httptools when installed)"),
    Setting("event_loop", "asyncio", _event_loop,
            "the workers' event loop: `\"asyncio\"` or `\"uvloop\"` (installed with `[http]`)"),
    Setting("http_options", {}, _options,
            "more keyword arguments of `uvicorn.Config` (`timeout_keep_alive`, `lifespan`, `ws`, "
            "`headers`, `root_path`, ...)"),
    # The cluster (pyswtask.cluster): only tasks declared with @task(queue=...) leave the host.
    Setting("cluster", None, _cluster_url,
            "Redis URL of the cluster this server joins (`redis://`, `rediss://`, `unix://`); "
            "None: no cluster"),
    Setting("node", None, _optional_str,
            "this server's name in the cluster; None: `hostname:pid` of the master"),
    Setting("cluster_queues", None, _queue_names,
            "cluster queues this node's task workers serve; None: every queue of its registered "
            "tasks (none without task workers)"),
    # At-least-once: a task pending this long on a node that stopped answering is claimed by
    # another node and run again.
    Setting("cluster_visibility_timeout", 30.0, _positive_seconds,
            "seconds a cluster task may stay unacknowledged before another node claims it"),
    Setting("cluster_max_deliveries", 5, _positive_int,
            "deliveries of a cluster task before it goes to the dead-letter stream"),
    # Tasks taken but not finished are invisible to the other nodes: a small number spreads a
    # queue over the nodes, a larger one hides the round trips to Redis.
    Setting("cluster_prefetch", 64, _positive_int,
            "cluster tasks a node's task workers take from Redis at a time (split among them, "
            "at least one each); its bridge claims at most as many"),
    # While Redis is unreachable a node keeps its workers' ASYNC cluster deliveries and sends
    # them when it answers again; past either bound they finish with ClusterUnavailable.
    Setting("cluster_hold_max", 100_000, _positive_int,
            "ASYNC cluster deliveries a node holds while Redis is unreachable; more finish at "
            "once with `ClusterUnavailable`"),
    Setting("cluster_hold_timeout", 30.0, _positive_seconds,
            "seconds a held ASYNC cluster delivery waits for Redis before it finishes with "
            "`ClusterUnavailable`"),
    Setting("cron_cluster", False, _bool,
            "every `@scheduled` rule fires once per cluster (a lease in Redis), not once per node"),
)

DEFAULTS: dict[str, Any] = {s.name: s.default for s in SETTINGS}


def validate(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The complete settings: the defaults, overridden by ``settings``, each checked and
    normalized (e.g. a ``message_queue_key`` given as "0x70001001" becomes an int).

    Raises TypeError naming any unknown setting, else ValueError naming the first bad one.
    """
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown server setting(s): {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(DEFAULTS))})")
    out = {**DEFAULTS, **settings}
    for setting in SETTINGS:
        if setting.check is not None:
            out[setting.name] = setting.check(setting.name, out[setting.name])
    return out
