"""The broker transport workers consume with: kombu's Redis transport, reusing its client.

kombu's Redis channel builds a new `redis.Redis` client (on the same connection pool)
for every piece of bookkeeping it does outside the consumer's own BRPOP: recording each
delivered message as unacked, and removing it again on ack. Building a client costs
more CPU than the two Redis round trips it is built for. A client on a connection pool
is safe to share between threads, so this channel builds one and keeps it.

celeryconfig names it as `broker_transport`; apart from the length of its BRPOP
(EMP_BROKER_POLL_S), everything else (keys, priorities, the
visibility timeout, restoring unacked messages) is kombu's Redis transport unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis

from emp_tasks.core.config import get_settings


class Channel(kombu_redis.Channel):
    _shared_client: Any = None
    _shared_lock = threading.Lock()

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        if self._shared_client is None:
            with self._shared_lock:
                if self._shared_client is None:
                    self._shared_client = self._create_client()
        yield self._shared_client

    def _disconnect_pools(self) -> None:
        # A new pool after a reconnect or a fork: the next client is built on it.
        self._shared_client = None
        super()._disconnect_pools()


class Transport(kombu_redis.Transport):
    """kombu's Redis transport; its BRPOP lasts EMP_BROKER_POLL_S (kombu: 1 s).

    Stopping, kombu reads the answer of the BRPOP under way, so that a message Redis
    popped for this worker is given back, not lost: a worker stops within that time.
    """

    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.brpop_timeout = get_settings().broker_poll_s
