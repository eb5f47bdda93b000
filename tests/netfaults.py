"""Network faults on loopback for storage tests: an endpoint that accepts connections and never
answers, and a TCP proxy that passes bytes on at a low, steady rate."""
from __future__ import annotations

import socket
import threading
import time
from typing import List


class SilentEndpoint:
    """A loopback socket that accepts connections, reads nothing and never answers.
    ``accepted_at`` holds the time.monotonic() of each connection it accepted."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted: List[socket.socket] = []
        self.accepted_at: List[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted_at.append(time.monotonic())
            self.accepted.append(conn)

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self.accepted:
            conn.close()
        self.sock.close()


class ThrottlingProxy:
    """A TCP proxy on loopback in front of ``upstream`` (host, port) that passes every
    connection's bytes on, both ways, at about ``bytes_per_s``, in small steady steps: a
    slow link that never stalls. ``moved`` counts the bytes passed on."""

    STEP_S = 0.02
    BUFFER = 32 * 1024

    def __init__(self, upstream: tuple, bytes_per_s: int):
        self.upstream = upstream
        self.step_bytes = max(1, int(bytes_per_s * self.STEP_S))
        self.sock = socket.socket()
        # small buffers, as on a slow link: on loopback the kernel would otherwise take in
        # megabytes at once, so a sender would finish long before its bytes get through
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.BUFFER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.BUFFER)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.moved = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets: List[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                continue
            server = socket.socket()
            server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.BUFFER)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.BUFFER)
            server.connect(self.upstream)
            self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                thread = threading.Thread(target=self._pump, args=(source, sink), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, source: socket.socket, sink: socket.socket):
        source.settimeout(0.2)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                data = source.recv(self.step_bytes)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            try:
                sink.sendall(data)
            except OSError:
                break
            with self._lock:
                self.moved += len(data)
            time.sleep(max(0.0, self.STEP_S - (time.monotonic() - started)))
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        for s in self._sockets:
            s.close()
        self.sock.close()
