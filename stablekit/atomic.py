"""Writing outputs so that a reader never sees half of one.

Every output (a converted model, a PNG, a folder) is written under a temporary name beside its destination and
renamed over it at the end: a crash, Ctrl-C or full disk leaves the destination as it was and removes the
temporary. Temporary names are created exclusively under random names (``mkstemp``/``mkdtemp``), so a link
planted beside the output is never followed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class WriteError(OSError):
    """An output cannot be written; the message names the path and the reason."""


def _umask_mode(base: int) -> int:
    # mkstemp/mkdtemp create 0600/0700; give the result what a plain open()/mkdir() would have.
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _parent(path: Path) -> Path:
    parent = path.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise WriteError(f"cannot write {path}: its folder {parent} {what}")
    return parent


def check_writable(path: str | os.PathLike[str]) -> None:
    """Fail now, not after minutes of work, if nothing can be created beside ``path``."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=_parent(path))
    except OSError as e:
        if isinstance(e, WriteError):
            raise
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from e
    os.close(fd)
    os.unlink(tmp)


@contextlib.contextmanager
def replacing_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary file beside ``path`` to write; it replaces ``path`` when the block succeeds and
    is removed when it fails."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=_parent(path))
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from e
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def replacing_folder(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path`` to fill; it becomes ``path`` when the block succeeds
    (an existing ``path`` is replaced only with ``overwrite``) and is removed when it fails."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise WriteError(f"{path} exists")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=_parent(path)))
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(0o777))
        if path.is_dir() and not path.is_symlink():
            # Two renames: the old folder steps aside, the new one takes its name, then the old one goes.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if path.exists() or path.is_symlink():
                path.unlink()
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
