"""Browser front end, end to end in headless Chromium (Debian's package) driven by Playwright.

The server runs as `medsapiens-landmarks serve` on a free loopback port; the test uploads a
cephalogram, detects, drags a point in the slice view, exports and fine-tunes, and leaves a
screenshot in $MEDSAPIENS_ARTIFACTS (default: the test's temporary folder).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from MedSapiensLandmarksLib.markups import read_markups

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port, export = free_port(), tmp_path / "cases"
    proc = subprocess.Popen([sys.executable, "-m", "MedSapiensLandmarksLib.cli", "serve", "--port", str(port),
                             "--export-dir", str(export)], cwd=ROOT / "MedSapiensLandmarks",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/", export
    proc.terminate()
    proc.wait(timeout=30)


def state(page, key):
    return page.evaluate(f"window.trame.state.get('{key}')")


@needs_chromium
def test_detect_drag_export_finetune_in_a_real_browser(server, ceph_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    url, export = server
    artifacts = Path(os.environ.get("MEDSAPIENS_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(120_000)
        page.goto(url)
        page.wait_for_selector("#detect")
        # a non-image upload is refused with a message, nothing loaded
        page.set_input_files("input[type=file]", str(bad))
        page.wait_for_selector("#error")
        assert "not a readable image" in page.inner_text("#error")
        page.fill("#spacing", "0.1")
        page.set_input_files("input[type=file]", str(ceph_dir / "images" / "151.jpg"))
        page.wait_for_function("document.querySelector('#status').innerText.includes('0.100 mm/pixel')")
        page.click("#detect")
        page.wait_for_function("document.querySelectorAll('#landmarks tbody tr').length == 19")
        names = page.eval_on_selector_all("#landmarks tbody td.name", "tds => tds.map(t => t.innerText)")
        assert sorted(names) == sorted(["S", "N", "Or", "Po", "A", "B", "Pog", "Me", "Gn", "Go", "LIT", "UIT",
                                        "UL", "LL", "Sn", "Pog'", "PNS", "ANS", "Ar"])
        before = {r["name"]: r for r in state(page, "rows")}
        view = page.query_selector("#view img").bounding_box()
        k = before["Go"]["index"]
        x, y = (view["x"] + state(page, "points_view")[k][0], view["y"] + state(page, "points_view")[k][1])
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x + 20, y + 15, steps=8)
        page.mouse.up()
        page.wait_for_function("window.trame.state.get('rows').some(r => r.name == 'Go' && r.corrected)")
        after = {r["name"]: r for r in state(page, "rows")}
        moved = np.subtract(after["Go"]["position"], before["Go"]["position"])
        assert np.linalg.norm(moved) > 2.0  # mm, at 0.1 mm/pixel
        assert not any(after[n]["corrected"] for n in after if n != "Go")
        assert page.inner_text("#landmarks tbody tr:has(td.name:text-is('Go')) td.corrected") == "corrected"
        page.click("#export")
        page.wait_for_function("document.querySelector('#status').innerText.startsWith('exported 151')")
        page.screenshot(path=str(artifacts / "web-detect-drag-export.png"))
        doc = read_markups(export / "cases" / "151" / "landmarks.mrk.json")
        assert doc["extra"]["corrected"][k] and sum(doc["extra"]["corrected"]) == 1
        ras = doc["lps"][k] * [-1, -1, 1]
        assert np.allclose(ras, after["Go"]["position"], atol=0.01)
        assert (export / "cases" / "151" / "image.nrrd").exists()
        assert json.loads((export / "dataset.json").read_text())["cases"][0]["corrected"] == 1
        page.click("#finetune")
        page.wait_for_function("document.querySelector('#status').innerText.startsWith('fine-tuned model')",
                               timeout=300_000)
        browser.close()
    assert (export.parent / "cases-model" / "model.json").exists()


@pytest.mark.parametrize("name", ["../etc/passwd.png", "a/b.png", "..png", ".hidden.png", "x.exe",
                                  "notes.txt", "C:\\evil.png", ""])
def test_upload_names_that_are_paths_or_not_images_are_refused(name):
    from MedSapiensLandmarksLib.web import UploadError, safe_upload_name

    with pytest.raises(UploadError):
        safe_upload_name(name)


def test_upload_names_of_images_pass():
    from MedSapiensLandmarksLib.web import safe_upload_name

    for name in ("151.jpg", "case 7.PNG", "scan.nii.gz", "ceph-01.dcm"):
        assert safe_upload_name(name) == name


def test_serve_binds_loopback_unless_told_otherwise(capsys):
    from MedSapiensLandmarksLib.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
