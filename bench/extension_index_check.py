"""Issue 26: run the Slicer Extensions Index's own check script on the extension repository
that `medsapiens-landmarks release --extension-repo` builds, offline.

    python bench/extension_index_check.py /path/to/ExtensionsIndex/scripts/check_description_files.py

The script is used unmodified. What needs the network is answered locally and said so in the
output: the clone of ``scm_url`` goes to the built repository (a local path), the catalog
schema comes from ../shared/reference, the icon and screenshot URLs are served from the built
repository's files, and the GitHub topics query gets `release.TOPICS` (set them on GitHub when
the repository is created).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedSapiensLandmarks"))
from MedSapiensLandmarksLib.release import TOPICS, build_extension_repo  # noqa: E402

SCHEMAS = ROOT.parent / "shared" / "reference"
RAW = "https://raw.githubusercontent.com/"


class _Response:
    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        self.status_code, self.content, self.headers = status, body, {"Content-Type": content_type}
        self.text = body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            import requests

            raise requests.HTTPError(f"{self.status_code}")


def offline_get(repo: Path, log: list[str]):
    def get(url: str, *args, **kwargs) -> _Response:
        if url.startswith("https://api.github.com/repos/") and url.endswith("/topics"):
            log.append(f"answered locally: {url} -> {list(TOPICS)}")
            return _Response(200, json.dumps({"names": list(TOPICS)}).encode(), "application/json")
        if url.startswith(RAW + "Slicer/Slicer/") and "/Schemas/" in url:
            path = SCHEMAS / url.rsplit("/", 1)[1]
        elif url.startswith(RAW):  # https://raw.githubusercontent.com/<owner>/<repo>/main/<path>
            path = repo / url[len(RAW):].split("/", 3)[3]
        else:
            return _Response(404, b"not served offline", "text/plain")
        log.append(f"answered locally: {url} -> {path.relative_to(path.parents[1])}")
        if not path.is_file():
            return _Response(404, b"missing", "text/plain")
        kind = {".png": "image/png", ".jpg": "image/jpeg", ".json": "application/json"}.get(path.suffix, "text/plain")
        return _Response(200, path.read_bytes(), kind)
    return get


def main() -> int:
    script = Path(sys.argv[1]).resolve()
    work = Path(tempfile.mkdtemp(prefix="index-check-"))
    try:
        repo = build_extension_repo(ROOT, work / "SlicerMedSapiensLandmarks")
        folder = work / "index"
        folder.mkdir()
        for entry in script.parents[1].glob("*.json"):  # the other extensions: the dependency check
            shutil.copyfile(entry, folder / entry.name)
        shutil.copyfile(repo / "MedSapiensLandmarks.json", folder / "MedSapiensLandmarks.json")
        spec = importlib.util.spec_from_file_location("check_description_files", script)
        check = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(check)
        log: list[str] = []
        check.requests.get = offline_get(repo, log)
        real_run = subprocess.run

        def run(cmd, *args, **kwargs):  # the clone of scm_url goes to the built repository
            if cmd[:2] == ["git", "clone"]:
                log.append(f"answered locally: git clone {cmd[-2]} -> {repo}")
                cmd = [*cmd[:-2], str(repo), cmd[-1]]
            return real_run(cmd, *args, **kwargs)

        check.subprocess.run = run
        out = io.StringIO()
        os.chdir(folder)
        sys.argv = ["check_description_files.py", "MedSapiensLandmarks.json"]
        with contextlib.redirect_stdout(out):
            code = check.main()
        print(out.getvalue())
        print("\n".join(log))
        print(f"exit code: {code}")
        return code
    finally:
        os.chdir(ROOT)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
