"""A small TCP load balancer: the one address in front of several web instances in a test.

Each accepted connection goes to the next backend in turn that accepts a connection; a backend
that refuses (or does not answer within `connect_timeout`) is passed over for that connection,
as haproxy's `option redispatch` does, so a dead instance costs no call that had not started.
Bytes are then copied both ways until either side closes; a connection cut by a backend's death
is closed towards the client, which sees it at the connection level and may retry.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading


class TcpBalancer:
    def __init__(self, backends: list[tuple[str, int]], connect_timeout: float = 1.0):
        self.backends = backends
        self.connect_timeout = connect_timeout
        self._turn = itertools.count()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        self.sent_to: dict[tuple[str, int], int] = {b: 0 for b in backends}
        self.refused: dict[tuple[str, int], int] = {b: 0 for b in backends}
        self._closing = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpBalancer:
        threading.Thread(target=self._accept, daemon=True, name="balancer").start()
        return self

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _connect(self) -> socket.socket | None:
        first = next(self._turn)
        for i in range(len(self.backends)):
            backend = self.backends[(first + i) % len(self.backends)]
            try:
                upstream = socket.create_connection(backend, timeout=self.connect_timeout)
            except OSError:
                self.refused[backend] += 1
                continue
            upstream.settimeout(None)
            self.sent_to[backend] += 1
            return upstream
        return None

    def _serve(self, client: socket.socket) -> None:
        upstream = self._connect()
        if upstream is None:
            client.close()
            return
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        client.close()
        upstream.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy until `source` ends (then end `sink`'s writing side, as the source did) or fails
    (then cut both, so the other direction's pump stops too)."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        for sock in (sink, source):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
