"""Child processes quantkit starts in their own session (engine workers, llm-compressor)."""

from __future__ import annotations

import os
import signal
import subprocess


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (it was started with ``start_new_session``, so
    vLLM's or llm-compressor's own children go too) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
