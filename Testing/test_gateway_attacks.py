"""The web server against other local programs, hostile clients and its own ending (issue 24).

Each test starts `medsapiens-landmarks serve` on a free loopback port, opens a session the way a
browser does, then tries one attack; all traffic stays on 127.0.0.1 and each test is bounded in
time. Worker processes are found through /proc (Linux); elsewhere these tests skip.
"""
from __future__ import annotations

import base64
import http.client
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from conftest import ROOT
from test_web import free_port

pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds workers through /proc")
PAGE = {"Sec-Fetch-Dest": "document", "Sec-Fetch-Mode": "navigate"}


def start(tmp_path, *extra):
    port = free_port()
    (tmp_path / "tmp").mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "MedSapiensLandmarksLib.cli", "serve", "--port", str(port),
                             "--export-dir", str(tmp_path / "cases"), *extra], cwd=ROOT / "MedSapiensLandmarks",
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("the gateway did not start")


def request(port, path="/", headers=None, method="GET", body=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data.decode("utf-8", "replace"), response


def open_session(port):
    """A browser's first page load: the session cookie (the worker is started)."""
    status, _, response = request(port, headers=PAGE, timeout=180)
    assert status == 302, status
    return response.getheader("Set-Cookie").split(";", 1)[0]


def workers(parent_pid):
    """(pid, port) of the session workers started by the gateway ``parent_pid``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"MedSapiensLandmarksLib.web" in args and ppid == parent_pid:
            found.append((int(proc.name), int(args[args.index(b"--port") + 1])))
    return found


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def rss_mb(pid):
    line = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


@pytest.fixture
def gateway(tmp_path):
    proc, port = start(tmp_path)
    yield proc, port
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_program_that_skips_the_gateway_gets_nothing_from_a_worker(gateway):
    proc, port = gateway
    cookie = open_session(port)
    ((pid, worker_port),) = workers(proc.pid)
    status, body, answer = request(worker_port)
    assert status == 403 and "answers its gateway only" in body
    assert answer.getheader("X-MedSapiens-Worker-Proof") is None  # nothing to replay on its port later
    status, _, _ = request(worker_port, "/ws", headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                                         "Sec-WebSocket-Version": "13",
                                                         "Sec-WebSocket-Key": base64.b64encode(b"k" * 16).decode(),
                                                         "X-MedSapiens-Worker": "wslink-secret"})
    assert status == 403  # a guessed secret (wslink's default one included) opens nothing
    assert b"MEDSAPIENS_WORKER_SECRET" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    status, body, _ = request(port, "/index.html", headers={"Cookie": cookie})
    assert status == 200 and "<html" in body.lower()  # through the gateway: the page


class _Trap(BaseHTTPRequestHandler):
    seen: list = []

    def do_GET(self):
        _Trap.seen.append(dict(self.headers))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"not the worker")

    def log_message(self, *args):
        pass


def test_a_program_on_a_dead_workers_port_gets_no_request_and_the_page_is_told(gateway):
    proc, port = gateway
    cookie = open_session(port)
    ((pid, worker_port),) = workers(proc.pid)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not alive(pid), 10)
    deadline = time.time() + 15
    while True:  # another program takes the port as soon as the system lets it
        try:
            trap = HTTPServer(("127.0.0.1", worker_port), _Trap)
            break
        except OSError:
            assert time.time() < deadline, "the dead worker's port never came free"
            time.sleep(0.2)
    threading.Thread(target=trap.serve_forever, daemon=True).start()
    try:
        status, body, _ = request(port, "/index.html", headers={"Cookie": cookie})
        assert status == 410 and "reload the page" in body
        assert _Trap.seen == []  # neither the cookie nor anything else reached the other program
        status, _, _ = request(port, headers={"Cookie": cookie, **PAGE}, timeout=180)
        assert status == 302  # a reload starts a new session
    finally:
        trap.shutdown()
        trap.server_close()


def test_two_signals_in_a_row_still_stop_every_worker_and_delete_the_uploads(tmp_path, gateway):
    proc, port = gateway
    open_session(port)
    ((pid, _),) = workers(proc.pid)
    uploads = list((tmp_path / "tmp").glob("medsapiens-uploads-*"))
    assert uploads and any(p.is_dir() for p in uploads[0].iterdir())
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert wait_for(lambda: not alive(pid), 15)
    assert not any(p.exists() for p in uploads)


def test_workers_exit_when_the_gateway_is_killed(tmp_path, gateway):
    proc, port = gateway
    open_session(port)
    ((pid, _),) = workers(proc.pid)
    session_uploads = [p for p in next((tmp_path / "tmp").glob("medsapiens-uploads-*")).iterdir()]
    proc.kill()
    proc.wait(timeout=30)
    assert wait_for(lambda: not alive(pid), 15)
    assert not any(p.exists() for p in session_uploads)  # the worker deleted its patient's files


def websocket(port, cookie):
    """A raw WebSocket through the gateway (what a hostile client can send)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: http://127.0.0.1:{port}\r\n"
                  f"Cookie: {cookie}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head[:200]
    return sock


def test_oversized_frames_and_bodies_are_refused_at_the_gateway(gateway):
    proc, port = gateway
    cookie = open_session(port)
    ((pid, _),) = workers(proc.pid)
    status, _, _ = request(port, "/", headers={"Cookie": cookie}, method="POST", body=b"x" * (3 * 2**20))
    assert status == 413
    before = rss_mb(proc.pid), rss_mb(pid)
    for _ in range(2):  # a 15-byte frame header claiming 1.2 GB, twice
        sock = websocket(port, cookie)
        sock.sendall(struct.pack("!BBQ", 0x82, 0x80 | 127, 1_200_000_000) + os.urandom(4))
        closing = sock.recv(64)
        assert closing[:1] == b"\x88" and struct.unpack("!H", closing[2:4])[0] == 1009  # message too big
        sock.close()
    time.sleep(1)
    assert rss_mb(proc.pid) - before[0] < 100 and rss_mb(pid) - before[1] < 100


def test_an_upload_streams_to_disk_and_an_oversized_one_is_cut_off_without_memory(tmp_path, gateway, ceph_dir):
    proc, port = gateway
    cookie = open_session(port)
    ((pid, _),) = workers(proc.pid)
    session_uploads = next(p for p in next((tmp_path / "tmp").glob("medsapiens-uploads-*")).iterdir())
    image = (ceph_dir / "images" / "151.jpg").read_bytes()
    status, _, _ = request(port, "/upload?name=151.jpg", {"Cookie": cookie}, "POST", image)
    assert status == 200 and (session_uploads / "151.jpg").read_bytes() == image
    before = rss_mb(proc.pid), rss_mb(pid)

    def chunks(total=250 * 2**20, block=b"\0" * 2**20):  # 250 MB, sent without a Content-Length
        for _ in range(total // len(block)):
            yield block
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/upload?name=big.png", body=chunks(), headers={"Cookie": cookie},
                     encode_chunked=True)
        status = conn.getresponse().status
    except (BrokenPipeError, ConnectionResetError):
        status = 413  # the gateway hung up on the rest of the body
    finally:
        conn.close()
    assert status == 413
    status, _, _ = request(port, "/upload?name=big.png", {"Cookie": cookie, "Content-Length": str(300 * 2**20)},
                           "POST", b"")
    assert status == 413  # a declared size over the limit: refused before reading
    assert rss_mb(proc.pid) - before[0] < 50 and rss_mb(pid) - before[1] < 50
    # no partial file left (beside it: the opened image's converted volume) once the worker has
    # seen the cut connection, which it notices after the gateway has answered 413
    deadline = time.monotonic() + 15
    while True:
        files = sorted(p.name for p in session_uploads.iterdir() if p.is_file())
        if files == ["151.jpg"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert files == ["151.jpg"]


def test_a_hung_worker_gets_a_timeout_and_its_reaping_does_not_stall_the_others(tmp_path):
    proc, port = start(tmp_path, "--upstream-timeout", "3", "--session-timeout", "15")
    try:
        hung, other = open_session(port), open_session(port)
        pid_hung = min(pid for pid, _ in workers(proc.pid))  # the first session's worker
        os.kill(pid_hung, signal.SIGSTOP)
        t = time.time()
        status, body, _ = request(port, "/index.html", headers={"Cookie": hung})
        assert status == 504 and time.time() - t < 10 and "no answer in 3 s" in body
        slowest = 0.0
        deadline = time.time() + 45
        while alive(pid_hung) and time.time() < deadline:  # reaped after 15 s idle: TERM, then KILL
            t = time.time()
            assert request(port, "/index.html", headers={"Cookie": other})[0] == 200
            slowest = max(slowest, time.time() - t)
            time.sleep(0.5)
        assert not alive(pid_hung) and slowest < 2.0, slowest
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_one_fine_tune_per_session_and_an_ended_session_leaves_no_half_model(tmp_path, ceph_dir):
    from MedSapiensLandmarksLib.web import LandmarksWebApp

    app = LandmarksWebApp(server="one-job", export_dir=tmp_path / "cases", uploads=tmp_path / "uploads")
    app.server.state.spacing = "0.1"
    app.load(ceph_dir / "images" / "151.jpg")
    app.detect()
    app.export()
    app.finetune()
    job = app.job
    assert job is not None and job.running and app.server.state.finetune_running
    app.finetune()  # a second click while the first job runs
    assert app.job is job and "already running" in app.server.state.error
    app.shutdown()  # the session ends (page closed, gateway stopped) before training is done
    assert not job.running and job.result()["status"] == "cancelled"
    assert not job.out_dir.exists() and job.out_dir.parent.parent == tmp_path


def test_a_3d_upload_offers_a_slice_choice_and_a_refused_upload_leaves_no_file(tmp_path, ceph_dir):
    import numpy as np
    import SimpleITK as sitk

    from MedSapiensLandmarksLib.web import LandmarksWebApp

    app = LandmarksWebApp(server="slices", export_dir=tmp_path / "cases", uploads=tmp_path / "uploads")
    state = app.server.state
    gray = sitk.GetArrayFromImage(sitk.ReadImage(str(ceph_dir / "images" / "151.jpg"), sitk.sitkUInt8))[::2, ::2]
    volume = sitk.GetImageFromArray(np.stack([np.zeros_like(gray), gray, np.zeros_like(gray)]))
    volume.SetSpacing((0.2, 0.2, 1.0))
    (tmp_path / "uploads").mkdir(exist_ok=True)
    sitk.WriteImage(volume, str(tmp_path / "uploads" / "ceph3d.nrrd"))
    app.open_upload(tmp_path / "uploads" / "ceph3d.nrrd")
    assert state.slices == 3 and state.slice_index == 1 and not state.error and "3 slices" in state.status
    assert app.volume is None and "--slice" not in state.status
    app.load_slice()  # the middle slice: the cephalogram
    assert state.slices == 0 and app.volume is not None and state.can_detect
    app.detect()
    assert app.markups.GetNumberOfControlPoints() == 19
    (tmp_path / "uploads" / "notes.png").write_bytes(b"not a png at all")
    app.open_upload(tmp_path / "uploads" / "notes.png")
    assert "not a readable image" in state.error and not (tmp_path / "uploads" / "notes.png").exists()
