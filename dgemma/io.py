"""Atomic file writes: a kill at any moment leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_file(tmp: str | Path, path: str | Path) -> None:
    """Move the finished file `tmp` onto `path` (same directory) durably: its bytes on disk, then one rename."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # the mode a plain open() would give, not mkstemp's private 0600
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        commit_file(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory beside `path`; on success it replaces `path` (the old one is removed after)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = _umask()
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers (safetensors) create private 0600 files; give them open()'s mode
            if f.is_file() and not f.is_symlink():
                f.chmod(0o666 & ~umask)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class JsonRecords:
    """A directory of JSON records, one file per key (an id the caller made, never a client's text), each written
    atomically, so a kill leaves every record whole: the old version or the new."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def save(self, key: str, record) -> None:
        atomic_write_text(self.path / f"{key}.json", json.dumps(record, ensure_ascii=False))

    def remove(self, key: str) -> None:
        (self.path / f"{key}.json").unlink(missing_ok=True)

    def load(self, log=None) -> list[tuple[str, object]]:
        """Every record, the least recently written first; a file that cannot be read is skipped (and named to
        `log`, a logging.Logger, as a warning)."""
        found = []
        for p in sorted(self.path.glob("*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name)):
            try:
                found.append((p.stem, json.loads(p.read_text())))
            except (OSError, ValueError):
                if log is not None:
                    log.warning("skipping unreadable %s", p)
        return found
