"""File modes: what the tool writes gets the mode a plainly created file would get (0666 minus the umask).

``tempfile.mkstemp`` creates 0600 files and safetensors' ``save_file`` writes 0600 too; a file renamed into
place from either would keep that mode whatever the user's umask (a model trained or imported into a shared
folder unreadable by the group).  Light on purpose: the model zoo imports it without SimpleITK.
"""

from __future__ import annotations

import os
import threading

_LOCK = threading.Lock()


def umask() -> int:
    """The process's umask (``os.umask`` can only be read by setting it; the lock keeps that atomic)."""
    with _LOCK:
        m = os.umask(0)
        os.umask(m)
    return m


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plainly created file would get (0666 minus the umask)."""
    os.chmod(path, 0o666 & ~umask())
