"""Child processes that own their process group, and stopping them with everything they started.

Used for fine-tuning (launched through PythonSlicer, which starts the real interpreter as its
own child and forwards no signal) and for the web gateway's per-session workers.
"""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Any


def own_group() -> dict[str, Any]:
    """Popen options: a new process group/session, and no console window on Windows."""
    if os.name != "nt":
        return {"start_new_session": True}
    info = subprocess.STARTUPINFO()
    info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
    info.wShowWindow = 0  # SW_HIDE
    return {"startupinfo": info, "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def stop_tree(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a child started with `own_group` and its descendants: TERM, then KILL (Windows:
    ``taskkill /T /F``, which walks the tree)."""
    if proc.poll() is not None:
        return
    if os.name == "nt":
        subprocess.run(["taskkill", "/PID", str(proc.pid), "/T", "/F"], capture_output=True, **own_group())
    else:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc.pid, signal.SIGKILL)  # stragglers of the group, if any
    proc.wait(timeout=timeout)
