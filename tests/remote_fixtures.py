"""Shards served over HTTP from a real server on 127.0.0.1 (with injectable faults), an S3 server (moto), and
helpers that damage shards the way a long run meets them.

Separate because it starts servers (threads, moto) that only the remote-reading and bad-shard tests need; it
writes no shards itself (shard_fixtures.py does).
"""

from __future__ import annotations

import functools
import io
import socket
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ShardServer:
    """Serves `root` on http://127.0.0.1:PORT/ (`port` 0: a free one). Faults per file name: `fail[name] = n`
    answers 500 n times; `truncate[name] = k` sends the full Content-Length but only k bytes, then drops the
    connection; `stall[name] = k` accepts and sends nothing (k None) or headers and k bytes, then keeps the
    connection open sending nothing until the server stops (a hung proxy, a stuck object store)."""

    def __init__(self, root: Path, port: int = 0) -> None:
        self.root = Path(root)
        self.fail: Counter = Counter()
        self.truncate: dict[str, int] = {}
        self.stall: dict[str, int | None] = {}
        self.requests: Counter = Counter()
        self.stopping = threading.Event()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                server.requests[name] += 1
                if server.fail[name] > 0:
                    server.fail[name] -= 1
                    self.send_error(500, "injected fault")
                    return
                if name in server.stall:
                    self.stall_after(name, server.stall[name])
                    return
                if name in server.truncate and (server.root / name).is_file():
                    data = (server.root / name).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: server.truncate[name]])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                super().do_GET()

            def stall_after(self, name: str, sent: int | None) -> None:
                if sent is not None:
                    data = (server.root / name).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:sent])
                    self.wfile.flush()
                server.stopping.wait(120)  # the client must give up first
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@contextmanager
def serve(root: Path) -> Iterator[ShardServer]:
    with ShardServer(root) as server:
        yield server


def replace_member(tar_path: Path, name: str, data: bytes) -> None:
    """Rewrite `tar_path` with member `name`'s bytes replaced (the other members unchanged, in order)."""
    with tarfile.open(tar_path) as src:
        members = [(info, src.extractfile(info).read()) for info in src.getmembers()]
    with tarfile.open(tar_path, "w") as out:
        for info, body in members:
            body = data if info.name == name else body
            info.size = len(body)
            out.addfile(info, io.BytesIO(body))


def truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
