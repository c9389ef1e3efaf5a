"""The built-in training corpus: the Python standard library's own ``*.py`` sources, as bytes.

It needs no network and no download: every Python installation carries it. The files are taken in
sorted path order (skipping ``site-packages`` and ``__pycache__``), joined with a newline and cut at
``max_bytes``, so the same installation always gives the same corpus. The result is cached as a
``uint8`` ``.npy`` file and reused.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
import sysconfig

import numpy as np

SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def default_cache_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/jaxsparse``, or ``~/.cache/jaxsparse``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jaxsparse"


def stdlib_sources(root: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """The standard library's ``*.py`` files under ``root`` (default: this Python's), sorted by path."""
    root = pathlib.Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the Python standard library folder {str(root)!r} does not exist")
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name not in SKIPPED_DIRS and not name.startswith("."))
        files.extend(pathlib.Path(folder) / name for name in names if name.endswith(".py"))
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def build_stdlib_corpus(max_bytes: int, root: str | os.PathLike | None = None) -> np.ndarray:
    """The first ``max_bytes`` bytes of the sorted standard-library sources, newline-joined, as uint8."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    chunks, total = [], 0
    for path in stdlib_sources(root):
        try:
            content = path.read_bytes()
        except OSError:  # an unreadable file (permissions) is skipped the same way every time
            continue
        chunks.append(content + b"\n")
        total += len(content) + 1
        if total >= max_bytes:
            break
    if not chunks:
        raise ValueError("found no *.py files in the Python standard library to build the corpus from")
    return np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8).copy()


def stdlib_corpus(max_bytes: int, cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """The built-in corpus, read from the cache when it is there, else built and cached.

    Args:
      max_bytes: the corpus size cap.
      cache_dir: the cache folder; None: :func:`default_cache_dir`.

    Returns:
      uint8 ``[N]`` bytes, ``N <= max_bytes``.
    """
    root = sysconfig.get_paths()["stdlib"]
    tag = hashlib.sha1(root.encode()).hexdigest()[:8]
    name = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{tag}-{max_bytes}.npy"
    path = pathlib.Path(cache_dir if cache_dir is not None else default_cache_dir()) / name
    if path.is_file():
        try:
            cached = np.load(path)
            if cached.dtype == np.uint8 and cached.ndim == 1 and 0 < cached.size <= max_bytes:
                return cached
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt below
    corpus = build_stdlib_corpus(max_bytes, root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(partial, corpus)
        os.replace(partial, path)
    except OSError:
        pass  # a read-only cache folder only costs a rebuild next time
    return corpus
