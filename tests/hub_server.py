"""A stand-in for the Hugging Face hub on 127.0.0.1: serves ``/{repo}/resolve/{revision}/{file}``.

huggingface_hub reaches it through ``HF_ENDPOINT``; files are sent in small slices with a pause, so a
download lasts long enough for progress to be seen. Records every request path.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


class HubServer:
    def __init__(self, files: dict[str, Path], slices: int = 40, pause: float = 0.02):
        """``files``: "org/name/filename" -> local file."""
        self.files = {key: Path(path) for key, path in files.items()}
        self.etags = {key: hashlib.sha256(path.read_bytes()).hexdigest() for key, path in self.files.items()}
        self.slices, self.pause = slices, pause
        self.requests: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _target(self):
                server.requests.append(f"{self.command} {self.path}")
                match = re.match(r"^/(?:api/models/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+?)(?:\?.*)?$", self.path)
                key = f"{match.group(1)}/{match.group(3)}" if match else None
                if key not in server.files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return key

            def _headers(self, key: str, size: int, status: int = 200, extra: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.send_header("ETag", f'"{server.etags[key]}"')
                self.send_header("X-Repo-Commit", COMMIT)
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.end_headers()

            def do_HEAD(self):
                key = self._target()
                if key:
                    self._headers(key, server.files[key].stat().st_size)

            def do_GET(self):
                key = self._target()
                if not key:
                    return
                data = server.files[key].read_bytes()
                start = 0
                ranged = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if ranged:
                    start = int(ranged.group(1))
                    body = data[start:]
                    self._headers(key, len(body), 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
                else:
                    body = data
                    self._headers(key, len(body))
                step = max(1, len(body) // server.slices)
                for offset in range(0, len(body), step):
                    self.wfile.write(body[offset : offset + step])
                    self.wfile.flush()
                    time.sleep(server.pause)

        return Handler
