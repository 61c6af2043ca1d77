"""A small Hub-compatible HTTP server on 127.0.0.1, enough for huggingface_hub's ``create_repo`` + ``upload_folder``.

Endpoints (what huggingface_hub 2.4 calls, with ``HF_HUB_DISABLE_XET=1``):
``POST /api/repos/create``, ``POST /api/validate-yaml``, ``POST /api/models/{ns}/{name}/branch/{rev}``,
``POST /api/models/{ns}/{name}/preupload/{rev}`` (every file "regular"), ``POST
/api/models/{ns}/{name}/commit/{rev}`` (NDJSON, files inline base64) and ``GET .../tree/{rev}``.
Every request is recorded with its ``Authorization`` header; uploaded files are kept in ``files``.
Set ``fail_on`` to an endpoint name (``"create"``, ``"commit"``, ...) to make it answer ``fail_status`` (500;
huggingface_hub retries some endpoints on 5xx with backoff, so use a 4xx for those).

Run standalone for manual tries: ``python tests/hub_server.py`` prints its URL.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>.+)$"), "branch"),
    ("POST", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)$"), "preupload"),
    ("POST", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)$"), "commit"),
    ("GET", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/?]+)"), "tree"),
]


def _route(method: str, path: str):
    """``(endpoint name, match)`` of a request, or ``(None, None)``."""
    for route_method, pattern, name in _ROUTES:
        match = pattern.match(path)
        if route_method == method and match:
            return name, match
    return None, None


class HubServer:
    """Start with ``with HubServer() as hub:``; ``hub.url`` is the endpoint."""

    def __init__(self):
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.files: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo, revision) -> path -> bytes
        self.commits: list[dict] = []
        self.fail_on: str | None = None
        self.fail_status = 500
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                self._dispatch("GET")

            def do_POST(self):
                self._dispatch("POST")

            def _reply(self, status: int, payload) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _dispatch(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?")[0]
                name, match = _route(method, path)
                hub.requests.append(
                    {
                        "method": method,
                        "path": path,
                        "endpoint": name,
                        "authorization": self.headers.get("Authorization"),
                    }
                )
                if name is None:
                    return self._reply(404, {"error": f"no route for {method} {path}"})
                if hub.fail_on == name:
                    return self._reply(hub.fail_status, {"error": f"server refused {name}"})
                return getattr(self, f"_on_{name}")(body, **match.groupdict())

            def _on_create(self, body: bytes):
                data = json.loads(body)
                repo = (
                    f"{data.get('organization') or 'user'}/{data['name']}" if "/" not in data["name"] else data["name"]
                )
                private = bool(data.get("private")) or data.get("visibility") == "private"
                hub.repos.setdefault(repo, {"private": private, "branches": {"main"}})
                return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo, "id": repo})

            def _on_validate_yaml(self, body: bytes):
                return self._reply(200, {"errors": [], "warnings": []})

            def _on_branch(self, body: bytes, repo: str, rev: str):
                hub.repos.setdefault(repo, {"private": False, "branches": {"main"}})["branches"].add(rev)
                return self._reply(200, {})

            def _on_preupload(self, body: bytes, repo: str, rev: str):
                files = json.loads(body).get("files", [])
                reply = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return self._reply(200, {"files": reply})

            def _on_commit(self, body: bytes, repo: str, rev: str):
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next((line["value"] for line in lines if line.get("key") == "header"), {})
                stored = hub.files.setdefault((repo, rev), {})
                for line in lines:
                    if line.get("key") == "file":
                        value = line["value"]
                        stored[value["path"]] = base64.b64decode(value["content"])
                oid = hashlib.sha1(body).hexdigest()
                hub.commits.append({"repo": repo, "revision": rev, "summary": header.get("summary"), "oid": oid})
                return self._reply(
                    200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
                )

            def _on_tree(self, body: bytes, repo: str, rev: str):
                return self._reply(200, [])

        return Handler


if __name__ == "__main__":
    with HubServer() as server:
        print(server.url, flush=True)
        threading.Event().wait()
