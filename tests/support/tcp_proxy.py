"""A TCP proxy the tests can cut and restore: a database "outage" for the processes that connect
through it, while the shared server (and everyone else's tests) carries on.

:meth:`TcpProxy.cut` closes the listening socket (new connections are refused, as by a stopped
server) and resets every open connection (as a server restart does); :meth:`TcpProxy.restore`
listens again on the same port. :attr:`TcpProxy.drop_next` resets that many newly accepted
connections before a byte is forwarded (a flaky network), counting them in ``dropped``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field

__all__ = ["TcpProxy"]


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    for sock in (src, dst):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


@dataclass
class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port``.

    Example:
        >>> with TcpProxy("127.0.0.1", 5432) as proxy:
        ...     url = f"postgresql://postgres@127.0.0.1:{proxy.port}/test"
        ...     proxy.cut(); proxy.restore()
    """

    target_host: str
    target_port: int
    port: int = 0
    connections: int = 0
    drop_next: int = 0
    dropped: int = 0
    _listener: socket.socket | None = None
    _open: list[socket.socket] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> TcpProxy:
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()

    @property
    def up(self) -> bool:
        return self._listener is not None

    def restore(self) -> None:
        """Listen (again, on the same port once it has one)."""
        if self._listener is not None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            open_socks, self._open = self._open, []
        for sock in open_socks:
            with contextlib.suppress(OSError):
                # RST rather than FIN: the peer sees the connection reset, as on a crash.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()

    def _drop(self, client: socket.socket) -> bool:
        """Reset ``client`` if it is one of the next ``drop_next`` connections."""
        with self._lock:
            if self.drop_next <= 0:
                return False
            self.drop_next -= 1
            self.dropped += 1
        with contextlib.suppress(OSError):
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        return True

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            if self._drop(client):
                continue
            try:
                upstream = socket.create_connection((self.target_host, self.target_port), 5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._open += [client, upstream]
                self.connections += 1
            threading.Thread(target=_pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
