"""A loopback HTTP server for release assets: counts requests, can cut a file short."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, *args, server_state: dict, **kwargs):
        self.state = server_state
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        self.state["requests"].append(self.path)
        name = self.path.rsplit("/", 1)[-1]
        if name in self.state["truncate"]:  # promise the whole file, send half, hang up
            data = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@contextmanager
def serve(folder: Path) -> Iterator[dict]:
    """Serve ``folder`` on 127.0.0.1; yields {"url", "requests", "truncate"}."""
    state: dict = {"requests": [], "truncate": set()}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(folder), server_state=state))
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
