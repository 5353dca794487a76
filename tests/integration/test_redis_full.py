"""A Redis at its maxmemory refuses writes: the learner's timeout names it, and the roles' back-off logs
it as one line per attempt instead of a traceback each time."""
import logging

import pytest
import redis

from actors.retry import Backoff
from buffer import ReplayBuffer
from buffer.testing import make_trajectory
from learner.fresh import FreshTimeoutError
from learner.learner import Learner


def test_the_learner_names_maxmemory_and_the_capacity_when_fresh_data_stops(small_learner_config, make_redis_server,
                                                                            run_name, tmp_path):
    server = make_redis_server()
    buf = ReplayBuffer(server.url, run_name, capacity=4321, seed=0)
    learner = Learner(small_learner_config(), buf, tmp_path, resume=False)
    buf.add([make_trajectory(i, 1.0, length=6) for i in range(2)])
    redis.Redis.from_url(server.url).config_set("maxmemory", "1")
    with pytest.raises(FreshTimeoutError, match=r"only 2 of the 4 fresh .* is full: used_memory .* maxmemory") as err:
        learner.train_step(wait_s=0.5)
    assert "buffer.capacity=4321" in str(err.value) and "CONFIG SET maxmemory" in str(err.value)
    buf.close()


def test_backoff_logs_a_traceback_once_per_streak_and_doubles_its_delay(caplog):
    log = logging.getLogger("test.backoff")
    backoff = Backoff("sampler 0", log, None, start=0.001, cap=0.004)
    with caplog.at_level(logging.INFO, logger="test.backoff"):
        for _ in range(4):
            backoff.failed(redis.ConnectionError("Connection refused"))
        backoff.ok()
        backoff.failed(redis.exceptions.OutOfMemoryError("command not allowed"))  # no buffer: the bare message
    first, *rest = caplog.records
    assert first.exc_info is not None and "sampler 0: failed" in first.getMessage()
    assert all(r.exc_info is None for r in rest)
    assert "still failing (4 in a row: ConnectionError: Connection refused)" in rest[2].getMessage()
    assert "working again after 4 failed attempt(s)" in rest[3].getMessage()
    assert "maxmemory" in rest[4].getMessage() and backoff.delay == 0.002
