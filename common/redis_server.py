"""A private `redis-server` on a free loopback port, with AOF in a directory of ours.

Used by the embedded `pag train` and by the test suite; never touches the machine's shared
server on 6379.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from common.errors import RedisUnavailableError


class RedisServerError(RedisUnavailableError, RuntimeError):
    """redis-server could not be started or did not answer."""

    label = "redis-server"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RedisServerError(
            "redis-server is not on PATH. Install it (Debian/Ubuntu: `sudo apt-get install redis-server`; "
            "macOS: `brew install redis`; conda: `conda install -c conda-forge redis`) "
            "or pass --redis-url redis://host:port to use a running server."
        )
    return path


class RedisServer:
    """Start with `RedisServer(dir).start()`; `url` connects; `stop()` shuts it down (saving AOF)."""

    def __init__(self, data_dir: Path | str, port: Optional[int] = None, password: Optional[str] = None,
                 appendfsync: str = "everysec") -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.password = password
        self.appendfsync = appendfsync
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(),
            "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes", "--appendfsync", self.appendfsync,
            "--save", "", "--daemonize", "no",
            # a trajectory hash (~1 KB blob) stays a compact listpack: ~19 % less memory per item
            "--hash-max-listpack-value", "4096",
            "--logfile", str((self.data_dir / "redis.log").resolve()),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = self.data_dir / "redis.log"
                tail = log.read_text()[-800:] if log.exists() else ""
                raise RedisServerError(f"redis-server exited with {self.proc.returncode}: {err}{tail}")
            try:
                if client.ping():
                    # AOF may still be loading; PING answers LOADING errors as exceptions
                    break
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RedisServerError(f"redis-server did not answer on port {self.port} within {timeout}s")
            time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            # no retries: SHUTDOWN closes the connection, and redis-py would otherwise retry with back-off
            client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                                 retry=Retry(NoBackoff(), 0))
            client.shutdown(nosave=False)
        except redis.ConnectionError:
            pass  # shutdown closes the connection under us
        except redis.RedisError:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: the crash case the durability tests need."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
