"""Connections to the cluster's Redis: one place that imports redis-py, checks the URL and turns
"cannot reach it" into ``ClusterUnavailable`` naming the URL (without its password).

Must not hold stream or lease logic: only how to connect and how to name a server in errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import ClusterUnavailable

if TYPE_CHECKING:
    import redis

__all__ = ["connect", "describe_url", "require_redis", "SCHEMES"]

SCHEMES = ("redis", "rediss", "unix")


def require_redis() -> Any:
    """The redis module, or ImportError naming the extra that installs it."""
    try:
        import redis
    except ImportError:
        raise ImportError("the cluster needs redis-py: pip install 'pyswtask[cluster]'") from None
    return redis


def describe_url(url: str) -> str:
    """The URL as errors and logs show it: a password is replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def check_url(url: Any, what: str = "cluster") -> str:
    """``url`` if it is a Redis URL redis-py accepts; ValueError naming ``what`` otherwise."""
    if not isinstance(url, str) or urlsplit(url).scheme not in SCHEMES:
        raise ValueError(f"{what} must be a Redis URL (redis://, rediss:// or unix://), "
                         f"not {url!r}")
    return url


def connect(url: str, *, timeout: float = 5.0, check: bool = True,
            **options: Any) -> redis.Redis:
    """A client of the Redis at ``url`` (``redis://``, ``rediss://`` for TLS, ``unix://``;
    a password or ACL user in the URL). Socket timeouts are bounded by ``timeout`` so that no
    caller waits on a stalled Redis for ever. With ``check``, one PING proves the server is
    there; ``ClusterUnavailable`` names the URL if it is not."""
    lib = require_redis()
    check_url(url)
    # RESP2 whatever redis-py's default: the task workers' consumers parse raw replies
    # (cluster.consumer), whose shapes differ in RESP3 (a dict per XREADGROUP).
    options.setdefault("protocol", 2)
    options.setdefault("socket_timeout", timeout)
    options.setdefault("socket_connect_timeout", timeout)
    client: redis.Redis = lib.Redis.from_url(url, **options)
    if check:
        try:
            client.ping()
        # AuthenticationError is a ConnectionError: it goes first.
        except lib.AuthenticationError as exc:
            client.close()
            raise ClusterUnavailable(f"the cluster's Redis at {describe_url(url)} refused the "
                                     f"credentials: {exc}") from exc
        except (lib.ConnectionError, lib.TimeoutError, OSError) as exc:
            client.close()
            raise ClusterUnavailable(f"cannot reach the cluster's Redis at {describe_url(url)}: "
                                     f"{exc}") from exc
    return client
