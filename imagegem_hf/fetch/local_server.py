"""A local HTTP server with fault injection, for testing and benchmarking the fetchers offline.

It listens on 127.0.0.1 only (an ephemeral port unless one is given), serves deterministic PNG images, files and
Civitai-shaped API pages, and misbehaves on request: the first path segment picks the behaviour.

| path | answer |
| --- | --- |
| `/img/N.png` | a PNG image (N picks its colour) |
| `/file/NAME` | the bytes registered with `server.files[NAME]` |
| `/missing/...` | 404 |
| `/ratelimit/...` | 429 with `Retry-After: 1` the first time, then the image |
| `/error/...` | 500 the first time, then the image |
| `/slow/...` | sleeps `slow_seconds` before answering |
| `/truncated/...` | announces more bytes than it sends, then closes |
| `/html/...` | a `text/html` page |
| `/corrupt/...` | `image/jpeg` bytes that are not a whole JPEG |
| `/loop/...` | a redirect to itself |
| `/api/v1/images`, `/api/v1/models` | pages of `api_items` items with `metadata.nextCursor` |
| `POST /v1/chat/completions` | `chat(request_json)` → `(status, body)`, a stand-in for an inference server |

`latency` adds a delay to every answer; `fail_after` makes it drop every connection after that many requests (a dead
server), until `fail_after` is reset.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from PIL import Image


def png_bytes(index: int, size: int = 8) -> bytes:
    """A small deterministic PNG whose colour depends on `index`."""
    colour = ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256)
    out = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(out, format="PNG")
    return out.getvalue()


def chat_completion(text: str) -> tuple[int, bytes]:
    """A chat-completions answer whose message is `text`."""
    return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()


def scoring_chat(request: dict) -> tuple[int, bytes]:
    """A stand-in VLM for `LocalServer.chat`: a fixed profile for captioning prompts; for ranking prompts, one JSON
    object per `image_id: N.` / `version_id: N.` in the text, scored 90 − (N mod 80) (so the right order is known)."""
    parts = request["messages"][0]["content"]
    text = " ".join(p["text"] for p in parts if p.get("type") == "text")
    found = re.findall(r"(image_id|version_id): (\d+)\.", text)
    if not found:
        return chat_completion("The user likes warm colours and simple shapes.")
    answer = [{key: item, "similarity_score": 90 - int(item) % 80, "explanation": "stand-in"} for key, item in found]
    return chat_completion(json.dumps(answer))


class _Handler(BaseHTTPRequestHandler):
    server: LocalServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _arrive(self, path: str) -> int | None:
        """Count the request; drop the connection (a dead server) or wait out the latency. Returns the path's hit
        count, or None when the connection was dropped."""
        server = self.server
        with server.lock:
            server.request_count += 1
            count = server.request_count
            server.hits[path] += 1
            hits = server.hits[path]
            server.arrivals.append((time.monotonic(), path, dict(self.headers)))
        if server.fail_after is not None and count > server.fail_after:
            self.close_connection = True
            self.connection.close()
            return None
        if server.latency:
            time.sleep(server.latency)
        return hits

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        server = self.server
        parts = urlsplit(self.path)
        hits = self._arrive(parts.path)
        if hits is None:
            return
        kind = parts.path.strip("/").split("/")[0]
        name = parts.path.rsplit("/", 1)[-1]
        index = int("".join(ch for ch in name if ch.isdigit()) or 0)
        if kind == "img" or (kind in ("ratelimit", "error") and hits > 1):
            self._send(200, png_bytes(index), "image/png")
        elif kind == "file" and name in server.files:
            self._send(200, server.files[name], "application/octet-stream")
        elif kind == "ratelimit":
            self._send(429, b"slow down", "text/plain", {"Retry-After": "1"})
        elif kind == "error":
            self._send(500, b"oops", "text/plain")
        elif kind == "slow":
            time.sleep(server.slow_seconds)
            self._send(200, png_bytes(index), "image/png")
        elif kind == "truncated":
            body = png_bytes(index)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body) + 1000))
            self.end_headers()
            self.wfile.write(body[:10])
            self.wfile.flush()
            self.close_connection = True
        elif kind == "html":
            self._send(200, b"<html>not an image</html>", "text/html; charset=utf-8")
        elif kind == "corrupt":
            self._send(200, b"\xff\xd8\xff\xe0" + b"\x00" * 20, "image/jpeg")
        elif kind == "loop":
            self._send(302, b"", "text/plain", {"Location": parts.path})
        elif kind == "api":
            self._api_page(parts)
        else:
            self._send(404, b"not found", "text/plain")

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        server = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self._arrive(self.path) is None:
            return
        if self.path.rstrip("/").endswith("/chat/completions") and server.chat is not None:
            status, answer = server.chat(json.loads(body))
            self._send(status, answer, "application/json")
        else:
            self._send(404, b"not found", "text/plain")

    def _api_page(self, parts) -> None:
        resource = parts.path.rstrip("/").rsplit("/", 1)[-1]
        items = self.server.api_items.get(resource)
        if items is None:
            self._send(404, b"unknown resource", "text/plain")
            return
        query = parse_qs(parts.query)
        start = int(query.get("cursor", ["0"])[0])
        limit = int(query.get("limit", ["100"])[0])
        page = items[start : start + limit]
        metadata = {"nextCursor": str(start + limit)} if start + limit < len(items) else {}
        self._send(200, json.dumps({"items": page, "metadata": metadata}).encode(), "application/json")


class LocalServer(ThreadingHTTPServer):
    """A fault-injecting HTTP server on 127.0.0.1, served from a daemon thread; use as a context manager.

    Args:
        port: Port to listen on (0: any free port).
        latency: Seconds added to every answer.

    Example:
        ```python
        >>> from imagegem_hf.fetch.local_server import LocalServer
        >>> with LocalServer() as server:  # doctest: +SKIP
        ...     print(server.url("/img/1.png"))
        ```
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int = 0, latency: float = 0.0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.latency = latency
        self.slow_seconds = 2.0
        self.fail_after: int | None = None
        self.files: dict[str, bytes] = {}
        self.api_items: dict[str, list] = {}
        self.chat: Callable[[dict], tuple[int, bytes]] | None = None
        self.lock = threading.Lock()
        self.request_count = 0
        self.hits: Counter[str] = Counter()
        self.arrivals: list[tuple[float, str, dict[str, str]]] = []  # (monotonic time, path, request headers)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> LocalServer:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def main() -> None:
    """Serve in the foreground (`python -m imagegem_hf.fetch.local_server --latency 0.02`); prints the port."""
    import argparse

    parser = argparse.ArgumentParser(description="A fault-injecting HTTP server on 127.0.0.1 (for tests).")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="Stop after this long (bounded run).")
    parser.add_argument("--chat", action="store_true", help="Answer chat completions with `scoring_chat`.")
    args = parser.parse_args()
    with LocalServer(port=args.port, latency=args.latency) as server:
        server.chat = scoring_chat if args.chat else None
        print(server.port, flush=True)
        time.sleep(args.max_seconds)


if __name__ == "__main__":
    main()
