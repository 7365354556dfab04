"""Where straw will write: found out without creating anything (`straw check`)."""

from __future__ import annotations

import os
from pathlib import Path


def nearest_folder(path: Path) -> tuple[Path, str | None]:
    """The nearest existing folder at or above `path`, and why new folders and files cannot go there (None:
    they can)."""
    folder = path
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return folder, f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return folder, f"{folder} is not writable for this user (or is read-only)"
    return folder, None
