"""Slow clients are cut off: headers that take longer than --header-timeout, and bodies slower
than --min-body-rate after it, get 408 and a closed connection, counted in /metrics, while
good requests in parallel are answered."""
from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from serving_support import encode, free_port, random_image

HEADER_TIMEOUT_S = 2
MIN_BODY_RATE = 2048  # bytes/s
TRICKLE_BODIES, TRICKLE_HEADERS, GOOD_REQUESTS = 10, 5, 12
GIVE_UP_S = 20  # a slow client stops waiting for the server after this long


@pytest.fixture(scope="module")
def strict_server(model_uri, tmp_path_factory):
    from kubeseg.serving.process import model_server

    port = free_port()
    log = tmp_path_factory.mktemp("slow-clients") / "server.log"
    running = model_server(
        model_uri, port, log_path=log, env=dict(os.environ, OMP_NUM_THREADS="1"),
        args=["--model-name", "shapes", "--max-pixels", str(64 * 64), "--threads", "1",
              "--header-timeout", str(HEADER_TIMEOUT_S), "--min-body-rate", str(MIN_BODY_RATE)])
    with running:
        yield running


def _trickle(port: int, head: bytes, drip: bytes, every_s: float) -> tuple:
    """Send ``head``, then ``drip`` every ``every_s`` until the server answers or closes:
    (first line of the answer or '', seconds from the connection to that answer)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=GIVE_UP_S) as conn:
        conn.settimeout(every_s)
        conn.sendall(head)
        answer = b""
        while time.monotonic() - started < GIVE_UP_S:
            try:
                chunk = conn.recv(4096)
            except socket.timeout:
                try:
                    conn.sendall(drip)
                except OSError:  # closed by the server
                    break
                continue
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
        line = answer.split(b"\r\n", 1)[0].decode("latin-1")
        return line, time.monotonic() - started


def _metric(text: str, name: str, labels: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and labels in line)


@pytest.mark.slow
def test_slow_clients_get_408_while_good_requests_are_answered(strict_server):
    port = int(strict_server.url.rsplit(":", 1)[1])
    body_head = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                 b"Content-Length: 50000\r\n\r\n\x89PNG")
    header_head = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nX-Slow: "
    image = encode(random_image(40, 32, seed=3), "PNG")
    good = []

    def send_good():
        for _ in range(GOOD_REQUESTS):
            response = requests.post(strict_server.url + "/invocations", data=image, timeout=60,
                                     headers={"Content-Type": "image/png"})
            good.append(response.status_code)

    with ThreadPoolExecutor(TRICKLE_BODIES + TRICKLE_HEADERS) as pool:
        # 40 bytes every 0.2 s (200 B/s): well below the floor of 2048 B/s
        bodies = [pool.submit(_trickle, port, body_head, b"\0" * 40, 0.2)
                  for _ in range(TRICKLE_BODIES)]
        # one header byte every 0.2 s: the headers never end
        headers = [pool.submit(_trickle, port, header_head, b"a", 0.2)
                   for _ in range(TRICKLE_HEADERS)]
        good_thread = threading.Thread(target=send_good)
        good_thread.start()
        good_thread.join(timeout=120)
        results = [f.result() for f in bodies + headers]
    metrics = requests.get(strict_server.url + "/metrics", timeout=30).text
    print("slow clients (first line, seconds):", [(line, round(s, 1)) for line, s in results])
    assert good == [200] * GOOD_REQUESTS, good
    for line, seconds in results:
        assert line == "HTTP/1.1 408 Request Timeout", (line, seconds)
        # the deadline and a margin for a loaded machine: never the whole trickle
        assert seconds < HEADER_TIMEOUT_S + 6, seconds
    assert _metric(metrics, "kubeseg_read_timeouts_total", 'part="body"') == TRICKLE_BODIES
    assert _metric(metrics, "kubeseg_read_timeouts_total", 'part="headers"') == TRICKLE_HEADERS
    assert _metric(metrics, "kubeseg_requests_total",
                   'route="/invocations",status="408"') == TRICKLE_BODIES
    assert strict_server.process.poll() is None


@pytest.mark.slow
def test_a_body_that_keeps_up_with_the_floor_is_answered(strict_server):
    """A body sent in pieces at about twice the floor rate takes longer than the grace
    period and is still answered."""
    port = int(strict_server.url.rsplit(":", 1)[1])
    image = encode(random_image(120, 96, seed=5), "PNG")
    assert len(image) > 3 * HEADER_TIMEOUT_S * MIN_BODY_RATE  # it takes several seconds
    piece, pause = 410, 0.1  # about 4 KiB/s
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(image))
        for start in range(0, len(image), piece):
            conn.sendall(image[start:start + piece])
            time.sleep(pause)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert time.monotonic() - started > HEADER_TIMEOUT_S
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
