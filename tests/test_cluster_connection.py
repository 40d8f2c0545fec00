"""Connecting to the cluster's Redis: the URL check, the error naming an unreachable server
(without its password), and the settings that declare a cluster."""

from __future__ import annotations

import pytest
from _redis import RedisServer, free_port

from pyswtask import ClusterUnavailable, Server
from pyswtask.cluster import connect, describe_url


def test_connect_pings_a_running_server(redis_server: RedisServer) -> None:
    client = connect(redis_server.url)
    try:
        assert client.ping() is True
    finally:
        client.close()


def test_unreachable_server_is_named_in_the_error() -> None:
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    with pytest.raises(ClusterUnavailable) as caught:
        connect(url, timeout=1.0)
    assert f"127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}" in str(caught.value)
    assert "secret" not in str(caught.value)


def test_password_is_required_and_used(tmp_path: object) -> None:
    from pathlib import Path

    server = RedisServer(Path(str(tmp_path)) / "redis", password="s3cret")
    server.start()
    try:
        with pytest.raises(ClusterUnavailable, match="refused the credentials"):
            connect(f"redis://127.0.0.1:{server.port}/0", timeout=2.0).set("k", "v")
        client = connect(server.url)
        assert client.set("k", "v") is True
        client.close()
    finally:
        server.stop()


def test_describe_url_hides_only_the_password() -> None:
    assert describe_url("redis://u:pw@h:6379/1") == "redis://u:***@h:6379/1"
    assert describe_url("rediss://h:6380/0") == "rediss://h:6380/0"


@pytest.mark.parametrize("value", ["http://h:1", 5, ""])
def test_bad_cluster_url_names_the_setting(value: object) -> None:
    with pytest.raises(ValueError, match="setting cluster must be a Redis URL"):
        Server(cluster=value)


def test_bad_cluster_settings_name_themselves() -> None:
    with pytest.raises(ValueError, match="setting cluster_queues"):
        Server(cluster_queues=[""])
    with pytest.raises(ValueError, match="setting cluster_visibility_timeout"):
        Server(cluster_visibility_timeout=0)
    with pytest.raises(ValueError, match="setting cluster_max_deliveries"):
        Server(cluster_max_deliveries=0)
