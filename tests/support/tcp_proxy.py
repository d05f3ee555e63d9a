"""A TCP proxy on 127.0.0.1 in front of a real server, to make that server look gone or flaky
without touching it (it is shared with other tests):

- :meth:`TcpProxy.stop` closes the listening socket and every open connection, so clients see
  their connections reset and new ones refused, exactly as when the server's host goes away;
  :meth:`TcpProxy.start` listens again on the same port (the server is back);
- :attr:`TcpProxy.drop_next` closes that many newly accepted connections at once, before a byte is
  forwarded (a flaky network), counting them in :attr:`TcpProxy.dropped`.

Threads: one accepting, two per connection pumping bytes each way.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading

__all__ = ["TcpProxy"]

_BUFFER = 256 * 1024


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port`` while started."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0  # chosen on the first start, kept afterwards
        self.drop_next = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._acceptor: threading.Thread | None = None

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Listen (on the same port as before, if any) and forward new connections."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._stopping.clear()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def stop(self) -> None:
        """Refuse new connections and reset every open one."""
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            _reset(conn)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            while not self._stopping.is_set():
                if not selector.select(timeout=0.05):
                    continue
                client, _ = self._listener.accept()
                with self._lock:
                    drop = self.drop_next > 0
                    if drop:
                        self.drop_next -= 1
                        self.dropped += 1
                if drop:
                    _reset(client)
                else:
                    self._connect(client)

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)
        with self._lock:
            self._conns |= {client, upstream}
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(_BUFFER):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):  # shutdown wakes the other pump's recv, then both close
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            with self._lock:
                self._conns -= {src, dst}


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset (SO_LINGER 0), as a vanished peer does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
