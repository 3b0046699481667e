"""A scripted OpenAI-compatible HTTP server on loopback, for testing the openai worker.

Each request takes the next scripted answer: a stream of tokens (with delays), a status with
a body and headers, or silence. Requests are recorded (path, headers, JSON body).
"""

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Answer:
    """One scripted answer."""

    tokens: list[str] = field(default_factory=list)
    status: int = 200
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    first_delay: float = 0.0
    """Seconds before the first byte of the answer."""
    token_delay: float = 0.0
    """Seconds between tokens."""
    hang: bool = False
    """Never answer (until the server stops)."""
    model: str = "fake-model"
    usage: dict[str, object] | None = None
    """The usage to report, in place of one counted from the tokens."""


class FakeModelServer:
    """`with FakeModelServer() as server:` ... `server.url` is the base URL (with /v1)."""

    def __init__(self) -> None:
        self.script: list[Answer] = []
        self.default = Answer(tokens=["Hello", " world"])
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with fake._lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers),
                                          "body": body})  # fmt: skip
                    answer = fake.script.pop(0) if fake.script else fake.default
                fake._answer(self, answer)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeModelServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, answer: Answer) -> None:
        if answer.hang:
            self._stop.wait()
            return
        if self._stop.wait(answer.first_delay):
            return
        if answer.status != 200:
            data = answer.body.encode()
            handler.send_response(answer.status)
            for key, value in {"Content-Type": "application/json", **answer.headers}.items():
                handler.send_header(key, value)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()

        def event(payload: str) -> None:
            data = f"data: {payload}\n\n".encode()
            handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            handler.wfile.flush()

        try:
            for i, token in enumerate(answer.tokens):
                if i and self._stop.wait(answer.token_delay):
                    return
                chunk = {
                    "model": answer.model,
                    "choices": [{"index": 0, "delta": {"content": token}}],
                }
                event(json.dumps(chunk))
            usage = answer.usage or {"prompt_tokens": 7, "completion_tokens": len(answer.tokens),
                                     "total_tokens": 7 + len(answer.tokens)}  # fmt: skip
            event(json.dumps({"model": answer.model, "choices": [], "usage": usage}))
            event("[DONE]")
            handler.wfile.write(b"0\r\n\r\n")
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass


def wait_for(condition: Any, timeout: float = 5.0) -> None:
    """Spin until `condition()` is true (for threads)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.01)
