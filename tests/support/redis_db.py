"""An empty Redis database claimed for one test: other runs on the same server (CI, a second
checkout) must not see its queue. The server is ``MPQ_TEST_REDIS_URL`` (default the local one).
Tests that use it carry the ``redis`` marker (see tests/conftest.py).
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["REDIS_URL", "RedisUnavailable", "claimed_redis_db"]

REDIS_URL = os.environ.get("MPQ_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
_LOCK_KEY = "mpq-test:lock"


class RedisUnavailable(RuntimeError):
    pass


@contextmanager
def claimed_redis_db(server_url: str = REDIS_URL) -> Iterator[str]:
    """Claim an empty database (1-15) with a ``SET NX`` lock key and yield its URL; flush it
    afterwards (the queue, kombu's bindings, unacked messages and the lock)."""
    import redis

    token = secrets.token_hex(8)
    dbs = list(range(1, 16))
    random.shuffle(dbs)
    for db in dbs:
        client = redis.Redis.from_url(f"{server_url}/{db}", socket_timeout=5)
        try:
            claimed = client.set(_LOCK_KEY, token, nx=True, ex=900)
        except redis.exceptions.ConnectionError as exc:
            client.close()
            raise RedisUnavailable(f"Redis not reachable at {server_url}: {exc}") from None
        except redis.exceptions.ResponseError:  # fewer databases configured
            client.close()
            continue
        if not claimed:
            client.close()
            continue
        if client.dbsize() != 1:  # someone else's data lives here: leave it alone
            if client.get(_LOCK_KEY) == token.encode():
                client.delete(_LOCK_KEY)
            client.close()
            continue
        try:
            yield f"{server_url}/{db}"
        finally:
            client.flushdb()
            client.close()
        return
    raise RedisUnavailable(f"no empty Redis database (1-15) to claim at {server_url}")
