"""`serve`: one browser session, one worker process, one patient (trame's launcher pattern).

The gateway is the only public listener. A browser that opens the page (with the access
token when the server is reachable from the network) gets a session cookie and its own
worker: a `web` app with its own slice view, scene, uploads and export folder, bound to
127.0.0.1 on a free port. Every HTTP request and WebSocket of that browser is proxied to its
worker, so two people never see each other's radiograph, points or exports. A worker answers
only requests that carry its session's secret (which the gateway alone holds: it is handed over
in the environment, never on a command line), and the gateway relays only answers that carry
the worker's proof of that secret: another local program can neither talk to a worker nor pose
as one on a port a dead worker left. Workers exit when the gateway does, however it ends (their
standard input is a pipe from it). Past
``max_sessions`` a new browser is told to come back later; a session whose page is closed
for ``idle_s`` seconds is ended: its worker stops and its uploaded files are deleted.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .processes import own_group, stop_tree

COOKIE = "medsapiens_session"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade", "content-length", "host"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SECRET_ENV = "MEDSAPIENS_WORKER_SECRET"  # how a worker gets its secret (not visible in `ps`)
SECRET_HEADER = "X-MedSapiens-Worker"  # gateway -> worker: the session's secret
PROOF_HEADER = "X-MedSapiens-Worker-Proof"  # worker -> gateway: it knows the secret
MAX_UPLOAD_BYTES = 200 * 2**20  # an uploaded file (`POST /upload`, streamed, never held whole)
MAX_MESSAGE = 16 * 2**20  # a WebSocket message: the page's state and the view's frames
MAX_BODY = 2**20  # any other HTTP request body


def proof(secret: str) -> str:
    return hmac.new(secret.encode(), b"medsapiens-worker", hashlib.sha256).hexdigest()


def guard_worker(app: Any, secret: str) -> None:
    """Make the worker's aiohttp ``app`` answer only the gateway (``secret`` on every request)
    and sign its answers with `proof`; called before the app starts."""
    from aiohttp import web

    signature = proof(secret)

    @web.middleware
    async def only_gateway(request: Any, handler: Any) -> Any:
        if not hmac.compare_digest(request.headers.get(SECRET_HEADER, "").encode(), secret.encode()):
            return web.Response(status=403, text="This worker answers its gateway only.\n")
        request["from_gateway"] = True
        return await handler(request)

    async def sign(request: Any, response: Any) -> None:
        if request.get("from_gateway"):  # a refused caller learns nothing it could replay
            response.headers[PROOF_HEADER] = signature

    app.middlewares.insert(0, only_gateway)
    app.on_response_prepare.append(sign)


def exit_with_parent(shutdown: Callable[[], None]) -> None:
    """In a worker: run ``shutdown`` and exit when the gateway's end of standard input closes
    (it exited, was killed or crashed) or the gateway stops it (SIGTERM)."""
    once = threading.Lock()

    def leave(*_: Any) -> None:
        with once:  # stdin's end and SIGTERM come together: one shutdown, the other waits for it
            try:
                shutdown()
            finally:
                os._exit(0)

    def watch() -> None:
        while sys.stdin.buffer.read(1 << 16):
            pass
        leave()
    threading.Thread(target=watch, daemon=True, name="exit-with-gateway").start()
    signal.signal(signal.SIGTERM, leave)


@dataclass
class Session:
    id: str
    port: int
    proc: subprocess.Popen
    uploads: Path
    secret: str
    sockets: int = 0
    last_seen: float = field(default_factory=time.monotonic)


class _Bounded:
    """The chunks of a request body, cut off past `MAX_UPLOAD_BYTES` (``over`` says so)."""

    def __init__(self, body: Any) -> None:
        self.body, self.over = body, False

    async def __aiter__(self) -> Any:
        size = 0
        async for chunk in self.body.iter_chunked(1 << 16):
            size += len(chunk)
            if size > MAX_UPLOAD_BYTES:
                self.over = True
                raise ValueError(f"upload larger than {MAX_UPLOAD_BYTES // 2**20} MB")
            yield chunk


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """Sessions and the reverse proxy (aiohttp)."""

    def __init__(self, export_dir: str | Path, model: str = "default", token: str | None = None,
                 max_sessions: int = 4, idle_s: float = 120.0, start_timeout_s: float = 180.0,
                 anatomy: str | None = None, loopback: bool = True, upstream_timeout_s: float = 120.0) -> None:
        self.export_dir = Path(export_dir).resolve()
        self.loopback = loopback  # bound to loopback only: the Host must name it
        self.model, self.token, self.max_sessions, self.anatomy = model, token, max_sessions, anatomy
        self.idle_s, self.start_timeout_s, self.upstream_timeout_s = idle_s, start_timeout_s, upstream_timeout_s
        self.sessions: dict[str, Session] = {}
        self.uploads_root = Path(tempfile.mkdtemp(prefix="medsapiens-uploads-"))
        self._lock = asyncio.Lock()
        self._client: Any = None

    # -- sessions ------------------------------------------------------------------------
    async def _start_session(self) -> Session:
        from aiohttp import ClientError

        sid, secret = secrets.token_urlsafe(24), secrets.token_urlsafe(32)
        port = free_port()
        label = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)  # nothing of the cookie
        uploads, exports = self.uploads_root / label, self.export_dir / label
        uploads.mkdir(parents=True)
        cmd = [sys.executable, "-m", "MedSapiensLandmarksLib.web", "--port", str(port),
               "--export-dir", str(exports), "--upload-dir", str(uploads), "--model", self.model,
               "--idle-timeout", str(int(self.idle_s) + 60)]
        cmd += ["--anatomy", self.anatomy] if self.anatomy else []
        proc = subprocess.Popen(cmd, cwd=str(Path(__file__).resolve().parents[1]), stdin=subprocess.PIPE,
                                env={**os.environ, SECRET_ENV: secret},
                                **own_group())  # its messages go to the server console
        session = Session(sid, port, proc, uploads, secret)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                await self._end(session)
                raise RuntimeError(f"the session worker exited with code {proc.returncode}")
            try:
                async with self._client.get(f"http://127.0.0.1:{port}/", headers={SECRET_HEADER: secret},
                                            timeout=self._timeout(10)) as answer:
                    if answer.headers.get(PROOF_HEADER) == proof(secret):
                        return session
            except (OSError, ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.3)
        await self._end(session)
        raise RuntimeError("the session worker did not start in time")

    async def _end(self, session: Session) -> None:
        """Stop the worker (its whole process group) and delete the session's uploads, off the
        event loop: a hung worker takes seconds to stop, the other sessions go on meanwhile."""
        self.sessions.pop(session.id, None)
        await asyncio.get_running_loop().run_in_executor(None, self._stop, session)

    @staticmethod
    def _stop(session: Session) -> None:
        if session.proc.stdin:
            session.proc.stdin.close()  # the worker exits on this alone, whatever else happens
        stop_tree(session.proc)
        shutil.rmtree(session.uploads, ignore_errors=True)

    async def reap(self) -> None:
        """End sessions whose page has been closed for ``idle_s`` (or whose worker died)."""
        while True:
            await asyncio.sleep(min(5.0, self.idle_s / 2))
            now = time.monotonic()
            for s in list(self.sessions.values()):
                if s.proc.poll() is not None or (s.sockets == 0 and now - s.last_seen > self.idle_s):
                    asyncio.create_task(self._end(s))

    def close(self) -> None:
        """Stop every worker and delete every upload (idempotent; also on a second signal)."""
        for s in list(self.sessions.values()):
            self.sessions.pop(s.id, None)
            self._stop(s)
        shutil.rmtree(self.uploads_root, ignore_errors=True)

    def _timeout(self, seconds: float) -> Any:
        import aiohttp

        return aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=seconds)

    # -- requests ------------------------------------------------------------------------
    def cross_site(self, request: Any) -> str:
        """Why a request is refused as coming from another site ("" when it is not): a Host that
        is not this server's loopback name (DNS rebinding), or an Origin other than the Host
        (a page of another port or site, using the user's cookie)."""
        host = request.headers.get("Host", "")
        if self.loopback and host.rsplit(":", 1)[0].strip("[]") not in LOOPBACK:
            return f"host {host!r} is not this server"
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{host}":
            return f"origin {origin!r} is another site"
        return ""

    @staticmethod
    def page_load(request: Any) -> bool:
        """A top-level page load (what may start a session): not an <img>, script or fetch
        (browsers say so in Sec-Fetch-Dest / Sec-Fetch-Mode)."""
        return (request.method == "GET" and request.path in ("/", "/index.html")
                and request.headers.get("Sec-Fetch-Dest", "document") == "document"
                and request.headers.get("Sec-Fetch-Mode", "navigate") == "navigate")

    def _token_ok(self, request: Any) -> bool:
        given = request.query.get("token", "")
        return self.token is None or hmac.compare_digest(given.encode(), self.token.encode())

    async def handle(self, request: Any) -> Any:
        from aiohttp import web

        refused = self.cross_site(request)
        if refused:
            return web.Response(status=403, text=f"Cross-site request refused: {refused}.\n")
        cookie = request.cookies.get(COOKIE, "")
        session = self.sessions.get(cookie)
        if session is not None and session.proc.poll() is not None:  # its worker died
            await self._end(session)
            return web.Response(status=410, text="This session's worker stopped (see the server's "
                                "console); reload the page to start a new session.\n")
        if session is None:
            if not self._token_ok(request):
                ended = "Your session has ended (page closed too long, or the server restarted). " if cookie else ""
                return web.Response(status=403, text=f"{ended}Access token required: open the address "
                                    "the server printed when it started (…/?token=…).\n")
            if not self.page_load(request):
                return web.Response(status=403, text="No session: open the page first.\n")
            async with self._lock:
                if len(self.sessions) >= self.max_sessions:
                    return web.Response(status=503, headers={"Retry-After": "60"},
                                        text=f"All {self.max_sessions} sessions are in use; "
                                             f"try again in a minute.\n")
                try:
                    session = await self._start_session()
                except RuntimeError as err:
                    return web.Response(status=500, text=f"Could not start a session: {err}\n")
                self.sessions[session.id] = session
            response = web.HTTPFound("/")  # drop the token from the address bar
            response.set_cookie(COOKIE, session.id, httponly=True, samesite="Strict", path="/")
            return response
        session.last_seen = time.monotonic()
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._proxy_ws(request, session)
        if request.method == "POST" and request.path == "/upload":
            return await self._proxy_http(request, session, stream=True)
        return await self._proxy_http(request, session)

    def _upstream_headers(self, request: Any, session: Session) -> dict[str, str]:
        """The browser's headers for the worker: its own cookie stays here, the secret is added."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | {"cookie"}}
        headers[SECRET_HEADER] = session.secret
        return headers

    async def _proxy_http(self, request: Any, session: Session, stream: bool = False) -> Any:
        """One request to the worker; an upload (``stream``) is passed on as it arrives, bounded
        by `MAX_UPLOAD_BYTES`, other bodies are read whole (bounded by `MAX_BODY`)."""
        from aiohttp import ClientError, web

        too_big = web.Response(status=413, text=f"The upload is larger than {MAX_UPLOAD_BYTES // 2**20} MB.\n")
        if stream and (request.content_length or 0) > MAX_UPLOAD_BYTES:
            return too_big
        body = _Bounded(request.content) if stream else None
        try:
            async with self._client.request(request.method, f"http://127.0.0.1:{session.port}{request.path_qs}",
                                            headers=self._upstream_headers(request, session),
                                            data=body if stream else await request.read(),
                                            allow_redirects=False,
                                            timeout=self._timeout(self.upstream_timeout_s)) as upstream:
                if upstream.headers.get(PROOF_HEADER) != proof(session.secret):
                    await self._end(session)
                    return web.Response(status=502, text="The session's worker did not answer as "
                                        "itself; the session was ended. Reload the page.\n")
                content = await upstream.read()
                out = {k: v for k, v in upstream.headers.items()
                       if k.lower() not in HOP_BY_HOP and k != PROOF_HEADER}
                return web.Response(status=upstream.status, body=content, headers=out)
        except asyncio.TimeoutError:
            return web.Response(status=504, text=f"The session's worker gave no answer in "
                                f"{self.upstream_timeout_s:g} s.\n")
        except (ValueError, ClientError, OSError) as err:
            if body is not None and body.over:  # cut off here (aiohttp may wrap the error)
                return too_big
            if isinstance(err, ValueError):
                raise
            return web.Response(status=502, text="The session's worker cannot be reached; reload the page.\n")

    async def _proxy_ws(self, request: Any, session: Session) -> Any:
        from aiohttp import ClientError, WSMsgType, web

        browser = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, compress=False, heartbeat=30)
        await browser.prepare(request)
        session.sockets += 1
        try:
            async with self._client.ws_connect(f"http://127.0.0.1:{session.port}{request.path_qs}",
                                               headers={SECRET_HEADER: session.secret},  # its own handshake
                                               max_msg_size=MAX_MESSAGE, heartbeat=30) as worker:
                answer = getattr(worker, "_response", None)  # aiohttp keeps the upgrade answer there
                if answer is None or answer.headers.get(PROOF_HEADER) != proof(session.secret):
                    await browser.close(code=1011, message=b"the session's worker did not answer as itself")
                    return browser

                async def pump(src: Any, dst: Any) -> None:
                    async for msg in src:
                        if msg.type == WSMsgType.BINARY:
                            await dst.send_bytes(msg.data)
                        elif msg.type == WSMsgType.TEXT:
                            await dst.send_str(msg.data)
                        else:
                            break
                tasks = [asyncio.create_task(pump(browser, worker)), asyncio.create_task(pump(worker, browser))]
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in tasks:
                    t.cancel()
        except (OSError, ClientError, asyncio.TimeoutError):
            pass  # the browser sees its socket close
        finally:
            session.sockets -= 1
            session.last_seen = time.monotonic()
            await browser.close()
        return browser

    def app(self) -> Any:
        import aiohttp
        from aiohttp import web

        async def startup(app: Any) -> None:
            self._client = aiohttp.ClientSession(auto_decompress=False,
                                                 timeout=aiohttp.ClientTimeout(total=None))
            app["reaper"] = asyncio.create_task(self.reap())

        async def cleanup(app: Any) -> None:
            for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut cleanup short
                signal.signal(sig, signal.SIG_IGN)
            app["reaper"].cancel()
            await self._client.close()
            self.close()

        application = web.Application(client_max_size=MAX_BODY)
        application.router.add_route("*", "/{tail:.*}", self.handle)
        application.on_startup.append(startup)
        application.on_cleanup.append(cleanup)
        return application


def serve(host: str = "127.0.0.1", port: int = 8080, export_dir: str = "medsapiens-cases",
          model: str = "default", token: str | None = None, max_sessions: int = 4,
          idle_s: float = 120.0, anatomy: str | None = None, upstream_timeout_s: float = 120.0) -> None:
    """Run the gateway until interrupted; off loopback a token is always required."""
    from aiohttp import web

    if token is None and host not in LOOPBACK:
        token = secrets.token_urlsafe(24)
    gateway = Gateway(export_dir, model, token, max_sessions, idle_s, anatomy=anatomy,
                      loopback=host in LOOPBACK, upstream_timeout_s=upstream_timeout_s)
    query = f"?token={token}" if token else ""
    print(f"MedSapiens Landmarks: open http://{host}:{port}/{query} "
          f"(up to {max_sessions} sessions; exports under {gateway.export_dir})", flush=True)
    try:
        web.run_app(gateway.app(), host=host, port=port, print=None, handle_signals=True)
    finally:  # however run_app ended (a second signal included): no worker, no upload left
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        gateway.close()
