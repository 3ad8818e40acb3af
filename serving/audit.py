"""Who may write the model repository: root, model and version folders writable by users
other than the owner (whoever can write there chooses what the server runs)."""

from __future__ import annotations

import stat
from pathlib import Path


def writable_folders(root: Path) -> dict[Path, str]:
    """Root, model and version folders that users other than the owner may write:
    folder -> "other" (world-writable) or "group"."""
    out: dict[Path, str] = {}
    folders = [root]
    try:
        for mdir in root.iterdir():
            if mdir.is_dir() and not mdir.name.startswith("."):
                folders.append(mdir)
                folders += [v for v in mdir.iterdir() if v.name.isdigit() and v.is_dir()]
    except OSError:
        pass
    for folder in folders:
        try:
            mode = folder.stat().st_mode
        except OSError:
            continue
        if mode & stat.S_IWOTH:
            out[folder] = "other"
        elif mode & stat.S_IWGRP:
            out[folder] = "group"
    return out


def folder_mode(path: Path) -> str:
    try:
        return stat.filemode(path.stat().st_mode)
    except OSError:
        return "?"
