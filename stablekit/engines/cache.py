"""The disk cache of converted models: converting pays once per weights, not once per process.

Layout under the cache folder (``--cache-dir``; default ``$STABLEKIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/stablekit``, else ``~/.cache/stablekit``)::

    digests.json                  remembered SHA-256 of large files (see stablekit.engines.digest)
    openvino/<entry>/<part>/      model.xml, model.bin, manifest.json: one converted network
    openvino/<entry>/compiled/<precision>-<cpu>/   the engine's compiled blobs for one precision and CPU

``<entry>`` is a SHA-256 over everything the conversion depends on: the content of every weights file read, the
loading options, the source of the modules converted, and the stablekit and engine versions. A part is written
under a temporary name and renamed, so a reader never sees half of one; its manifest holds each file's SHA-256,
checked before use, so a damaged or partly deleted part is rebuilt rather than run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from stablekit.atomic import WriteError, replacing_folder
from stablekit.engines.digest import DigestMemo

MANIFEST = "manifest.json"
FORMAT = 1  # bumped when the layout of an entry changes


def default_cache_dir() -> Path:
    env = os.environ.get("STABLEKIT_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "stablekit"


def weight_files(path: Path) -> list[Path]:
    """The files whose content a model at ``path`` is made from: the file itself, or every file of a folder."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [path]


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


class ModelCache:
    """Converted networks under ``root``, keyed by content."""

    def __init__(self, root: Path, engine: str) -> None:
        self.root = Path(root)
        self.engine_root = self.root / engine
        self.memo = DigestMemo(self.root / "digests.json")

    def check_usable(self) -> None:
        """Make the folder, or raise :class:`WriteError` saying why it cannot be: before any slow work."""
        try:
            self.engine_root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteError(f"cache folder {self.root}: {e.strerror or e}") from e
        if not os.access(self.engine_root, os.W_OK | os.X_OK):
            raise WriteError(f"cache folder {self.root}: not writable")

    def key(self, sources: Iterable[Path], facts: dict[str, object]) -> str:
        """The entry key: the SHA-256 of ``facts`` and the content digest of each source file."""
        digests = []
        for source in sources:
            for f in weight_files(source):
                rel = f.relative_to(source) if source.is_dir() else Path(f.name)
                digests.append([str(rel), self.memo.digest(f)])
        blob = json.dumps({"format": FORMAT, "facts": facts, "weights": digests}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def part(self, key: str, name: str) -> Path:
        return self.engine_root / key / name

    def problem(self, part: Path) -> str | None:
        """Why the part at ``part`` cannot be used (missing, damaged), or None when every file checks out."""
        try:
            manifest = json.loads((part / MANIFEST).read_text())
            files = manifest["files"]
            if manifest.get("format") != FORMAT or not isinstance(files, dict) or not files:
                return "written by another version"
        except FileNotFoundError:
            return "not built yet"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"its manifest is unreadable ({e})"
        for name, digest in files.items():
            f = part / str(name)
            try:
                if self.memo.digest(f) != digest:
                    return f"{name} does not match its recorded digest"
            except OSError as e:
                return f"{name}: {e.strerror or e}"
        return None

    def store(self, part: Path, write: Callable[[Path], None]) -> None:
        """Fill a fresh folder with ``write(folder)``, record each file's digest, and put it at ``part``."""
        part.parent.mkdir(parents=True, exist_ok=True)
        with replacing_folder(part, overwrite=True) as tmp:
            write(tmp)
            files = {p.name: self.memo.digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files}, indent=1))
        # The files kept their inodes through the rename: remember their digests under their final names.
        for name, digest in files.items():
            self.memo.remember(part / name, digest)

    def compiled_dir(self, key: str, flavour: str) -> Path:
        path = self.engine_root / key / "compiled" / flavour
        path.mkdir(parents=True, exist_ok=True)
        return path

    def size(self, key: str | None = None) -> int:
        """Bytes held by one entry, or by the whole engine folder."""
        return folder_size(self.engine_root / key if key else self.engine_root)

    def clear_compiled(self, key: str) -> None:
        shutil.rmtree(self.engine_root / key / "compiled", ignore_errors=True)
