"""`pag train` waiting for Redis (driver/outage.py): a private redis-server that died is restarted on its
AOF; one that stays away past buffer.max_outage_s stops the run naming how to continue."""
import time

import pytest
import redis

from buffer import ReplayBuffer
from buffer.testing import make_trajectory
from common.redis_server import RedisServer
from driver.outage import RedisOutageError, is_outage, wait_for_redis


def test_a_dead_private_server_is_restarted_on_its_aof_with_the_buffer_intact(tmp_path, run_name):
    server = RedisServer(tmp_path / "redis", appendfsync="always").start()
    buf = ReplayBuffer(server.url, run_name, reconnect_retries=1)
    try:
        trajs = [make_trajectory(i, float(i)) for i in range(3)]
        buf.add(trajs)
        server.kill()
        with pytest.raises(redis.ConnectionError):
            buf.client.ping()
        waited = wait_for_redis(buf, 30, redis.ConnectionError("refused"), run_name, server, poll_s=0.1)
        assert waited < 30 and server.proc.poll() is None
        assert [buf.get(t.id) for t in trajs] == trajs
    finally:
        buf.close()
        server.stop()


def test_an_outage_past_the_limit_stops_naming_how_to_resume(tmp_path, run_name):
    server = RedisServer(tmp_path / "redis").start()
    buf = ReplayBuffer(server.url, run_name, reconnect_retries=0)
    server.kill()
    start = time.monotonic()
    with pytest.raises(RedisOutageError) as err:
        wait_for_redis(buf, 1.0, redis.ConnectionError("Connection refused"), run_name, None, poll_s=0.2)
    message = str(err.value)
    assert time.monotonic() - start < 10
    assert f"Redis at {buf.url} has been unreachable for" in message and "buffer.max_outage_s=1" in message
    assert f"pag train --resume --run-name {run_name}" in message and "Connection refused" in message
    assert err.value.exit_code == 3
    buf.close()


def test_a_wrong_password_is_not_an_outage_to_wait_for():
    assert is_outage(redis.ConnectionError("refused")) and is_outage(redis.TimeoutError("slow"))
    assert not is_outage(redis.exceptions.AuthenticationError("invalid password"))
    assert not is_outage(redis.exceptions.AuthorizationError("NOPERM"))
    assert not is_outage(ValueError("a bug"))
