"""The web chat page's development server: `python -m imdev.web`, started by
`make run` (and in-process by the browser tests).

It serves, on loopback, GET only:

- `/` and the page's files from `web/`;
- `/lib/...`: the TypeScript client's build (`clients/ts/dist`, plain ES modules);
- `/vendor/protobuf/...`: the protobuf-es runtime's ES modules
  (`clients/ts/node_modules/@bufbuild/protobuf/dist/esm`), which the page's import
  map names: no bundler;
- `/config.json`: the gateways' WebSocket URLs;
- `/dev/token?user=U&device=D`: a token for any user, minted with the stack's
  secret. DEVELOPMENT ONLY: it stands in for an application's backend, which
  mints a token after its own sign-in (docs/protocol.md, "Tokens"). Whoever
  reaches it can act as anyone, so it binds to 127.0.0.1 and `make run` is the
  only thing that starts it.

Settings from the environment: IM_WEB_WS_URLS (comma-separated ws:// URLs),
IM_GATEWAY_TOKEN_SECRET (default: the dev secret).
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from imclient.tokens import DEV_TOKEN_SECRET, ID_PATTERN, mint_token
from imdev.servers import Managed

ROOT = Path(__file__).resolve().parents[2]
WEB_DIR = ROOT / "web"
TS_DIR = ROOT / "clients" / "ts"
#: URL prefix -> directory it serves.
MOUNTS = {
    "/lib/": TS_DIR / "dist",
    "/vendor/protobuf/": TS_DIR / "node_modules" / "@bufbuild" / "protobuf" / "dist" / "esm",
    "/": WEB_DIR,
}
TOKEN_TTL_S = 12 * 3600
_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".map": "application/json"}


@dataclass(frozen=True)
class WebConfig:
    ws_urls: Sequence[str]
    token_secret: str


def _content_type(path: Path) -> str:
    # Module scripts must be served as JavaScript; the system's mime table may not say so.
    return (
        _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    )


def _resolve(url_path: str) -> Path | None:
    """The file a URL path names inside one of the mounts, or None (never a path
    outside them)."""
    for prefix, directory in MOUNTS.items():
        if url_path.startswith(prefix):
            rest = url_path[len(prefix) :] or "index.html"
            base = directory.resolve()
            path = (base / rest).resolve()
            if path.is_relative_to(base) and path.is_file():
                return path
            return None
    return None


class _Handler(BaseHTTPRequestHandler):
    server: DevWebServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        if os.environ.get("IM_WEB_ACCESS_LOG"):
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: object) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        config = self.server.config
        if url.path == "/config.json":
            self._json(HTTPStatus.OK, {"wsUrls": list(config.ws_urls), "devTokens": True})
            return
        if url.path == "/dev/token":
            query = parse_qs(url.query)
            user = (query.get("user") or [""])[0]
            device = (query.get("device") or ["web"])[0]
            if not ID_PATTERN.fullmatch(user) or not ID_PATTERN.fullmatch(device):
                self._json(
                    HTTPStatus.BAD_REQUEST, {"error": "user and device: [A-Za-z0-9_.@-]{1,64}"}
                )
                return
            token = mint_token(config.token_secret, user, device, TOKEN_TTL_S)
            self._json(HTTPStatus.OK, {"token": token, "user": user, "device": device})
            return
        path = _resolve(url.path)
        if path is None:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
            return
        self._send(HTTPStatus.OK, path.read_bytes(), _content_type(path))


class DevWebServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, config: WebConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _Handler)
        self.config = config

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def serve_in_thread(self) -> threading.Thread:
        """Serves on a daemon thread (tests); `shutdown()` stops it."""
        thread = threading.Thread(target=self.serve_forever, name="imdev-web", daemon=True)
        thread.start()
        return thread


class WebProcess(Managed):
    """The dev web server as a process of `make run` (recorded in its state and
    pid files like the others, stopped by `make stop`)."""

    name = "web"

    def __init__(self, port: int, workdir: Path, ws_urls: Sequence[str], secret: str) -> None:
        super().__init__(port, workdir / "web", workdir / "logs" / "web.log")
        self.ws_urls = list(ws_urls)
        self.secret = secret

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "imdev.web", "--port", str(self.port)]

    def env(self) -> dict[str, str]:
        # The secret travels in the environment, never on the command line.
        return {
            **os.environ,
            "IM_WEB_WS_URLS": ",".join(self.ws_urls),
            "IM_GATEWAY_TOKEN_SECRET": self.secret,
        }

    def prepare(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imdev.web")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    urls = [u for u in os.environ.get("IM_WEB_WS_URLS", "").split(",") if u]
    secret = os.environ.get("IM_GATEWAY_TOKEN_SECRET") or DEV_TOKEN_SECRET
    if not (TS_DIR / "dist" / "index.js").exists():
        print("clients/ts is not built: `make ts-build` first", flush=True)
    server = DevWebServer(WebConfig(urls, secret), args.host, args.port)
    print(f"serving the web chat on {server.url} (dev tokens: DEVELOPMENT ONLY)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


#: `make run`'s web chat port, as an offset from IM_DEV_BASE_PORT (the gateways'
#: WebSocket ports are +150..+159).
PORT_OFFSET = 160
