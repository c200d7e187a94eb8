"""Lazy weight downloads into a per-user cache, checked by SHA256 (local files work offline)."""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

from .atomic import fsync_file
from .errors import CheckpointError


def cache_dir() -> Path:
    """$MEDSAPIENS_CACHE, else the platform's per-user cache folder."""
    env = os.environ.get("MEDSAPIENS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.environ.get("LOCALAPPDATA") or Path.home() / ".cache"
    return Path(base) / "medsapiens-landmarks"


def sha256sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _target(url: str, sha256: str, name: str | None = None) -> Path:
    return cache_dir() / sha256.lower()[:12] / (name or url.rstrip("/").rsplit("/", 1)[-1])


def cached(url: str, sha256: str) -> Path | None:
    """The cached file of ``url`` if it was fetched before."""
    target = _target(url, sha256)
    return target if target.exists() else None


def fetch(url: str, sha256: str, name: str | None = None, size: int | None = None,
          progress: Callable[[int, int], None] | None = None) -> Path:
    """Return the cached file for ``url``, downloading it first if needed.

    ``url`` may be a local path (offline sites copy the file by hand). The file is only put
    into the cache once its size (when given) and SHA256 match; a failure raises and leaves
    nothing in the cache.
    """
    local = Path(url).expanduser()
    target = _target(url, sha256, name)
    if target.exists():
        return target
    cache_dir().mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir(), suffix=".part")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        if local.exists():
            shutil.copyfile(local, tmp_path)
        else:
            _download(url, tmp_path, size, progress)
        got_size = tmp_path.stat().st_size
        if size is not None and got_size != size:
            raise CheckpointError(f"{url}: got {got_size} bytes, expected {size} (an interrupted download?); "
                                  f"nothing was kept, try again")
        got = sha256sum(tmp_path)
        if got != sha256.lower():
            raise CheckpointError(f"{url}: SHA256 {got} does not match the expected {sha256}; nothing was kept")
        target.parent.mkdir(exist_ok=True)
        fsync_file(tmp_path)
        try:
            os.replace(tmp_path, target)
        except OSError:  # another process put the same (digest-checked) file there first
            if not target.exists():
                raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return target


def _download(url: str, out_path: Path, size: int | None, progress: Callable[[int, int], None] | None) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(out_path, "wb") as out:
            total, done = int(resp.headers.get("Content-Length") or size or 0), 0
            while block := resp.read(1 << 20):
                out.write(block)
                done += len(block)
                if size is not None and done > size:
                    raise CheckpointError(f"{url}: more than the {size} bytes the index lists; refused")
                if progress:
                    progress(done, total)
        if total and done != total:
            raise CheckpointError(f"{url}: the download stopped at {done} of {total} bytes; nothing was kept, "
                                  f"try again")
    except (OSError, http.client.HTTPException) as err:
        raise CheckpointError(f"{url}: download failed ({err}); behind a proxy or offline, download the "
                              f"file elsewhere and give its local path (a model .zip: unzip it into a "
                              f"folder of $MEDSAPIENS_MODELS)") from None


def unpack(archive: Path) -> Path:
    """A cached .zip unpacked beside it (once, atomically); returns the folder holding
    ``model.json`` (the archive's root or its single top folder)."""
    target = archive.with_suffix("")
    if not target.exists():
        tmp = Path(tempfile.mkdtemp(dir=archive.parent, suffix=".part"))
        try:
            with zipfile.ZipFile(archive) as zf:
                bad = [n for n in zf.namelist() if n.startswith("/") or ".." in Path(n).parts]
                if bad:
                    raise CheckpointError(f"{archive}: refused archive member {bad[0]!r}")
                zf.extractall(tmp)
            try:
                os.replace(tmp, target)
            except OSError:  # another process unpacked it first
                if not target.exists():
                    raise
        except zipfile.BadZipFile as err:
            archive.unlink(missing_ok=True)  # fetched again next time
            raise CheckpointError(f"{archive}: not a readable zip archive ({err}); removed from the cache, "
                                  f"try again") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    folder = model_folder(target)
    if folder is None:
        raise CheckpointError(f"{archive}: expected one model folder (a model.json) in the archive")
    return folder


def model_folder(unpacked: Path) -> Path | None:
    """The one folder holding ``model.json`` in an unpacked archive (its root or its single top
    folder), or None."""
    cards = sorted(unpacked.glob("model.json")) or sorted(unpacked.glob("*/model.json"))
    return cards[0].parent if len(cards) == 1 else None
