"""A persistent cache of video files' frame counts, so a large data set (Kinetics: hundreds of
thousands of files) is probed once rather than at every start.

One JSON file per data root under ``$C3DZOO_CACHE_DIR`` (default ``$XDG_CACHE_HOME/c3dzoo`` or
``~/.cache/c3dzoo``), ``video-index/<hash of the root's absolute path>.json``, mapping each video
file's absolute path to ``[size, mtime_ns, frames or reason unreadable]``. An entry counts only while
the file's size and modification time are unchanged, so edited or replaced files are probed again.
The cache is an optimisation: an unreadable or unwritable cache is ignored (the scan probes).
Frame folders are not cached (listing one is what counting it costs).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Dict, List, Optional, Union

CACHE_ENV_VAR = "C3DZOO_CACHE_DIR"
_VERSION = 1

Probe = Union[int, str]  # a frame count, or why the video is unreadable


def cache_dir() -> str:
    """Where c3dzoo keeps caches: ``$C3DZOO_CACHE_DIR``, else ``$XDG_CACHE_HOME/c3dzoo``, else
    ``~/.cache/c3dzoo``."""
    explicit = os.environ.get(CACHE_ENV_VAR, "").strip()
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "c3dzoo")


def _signature(path: str) -> Optional[List[int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


class FrameCountCache:
    """The cached probes of the videos under one data root."""

    def __init__(self, root: str, directory: Optional[str] = None):
        key = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:20]
        self.path = os.path.join(directory or cache_dir(), "video-index", f"{key}.json")
        self._entries: Dict[str, list] = {}
        self._dirty = False
        try:
            with open(self.path) as f:
                data = json.load(f)
            if isinstance(data, dict) and data.get("version") == _VERSION and isinstance(data.get("videos"), dict):
                self._entries = data["videos"]
        except (OSError, ValueError):
            pass  # no cache yet, or an unreadable one: probe

    def get(self, path: str) -> Optional[Probe]:
        """The cached probe of ``path`` if the file is unchanged since, else None."""
        entry = self._entries.get(os.path.abspath(path))
        if not entry or len(entry) != 3 or _signature(path) != entry[:2]:
            return None
        return entry[2]

    def put(self, path: str, probe: Probe) -> None:
        signature = _signature(path)
        if signature is not None:
            self._entries[os.path.abspath(path)] = [*signature, probe]
            self._dirty = True

    def save(self) -> None:
        """Write the cache (atomically) if anything changed; failures are ignored."""
        if not self._dirty:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": _VERSION, "videos": self._entries}, f)
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError:
            pass
