"""Write files and directories so that a failure leaves nothing half-written."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_created(path: Path, mode: int) -> None:
    """Give ``path`` the permissions a plain ``open``/``mkdir`` would (mkstemp/mkdtemp make them private: 0600/0700)."""
    try:
        os.chmod(path, mode & ~_umask())
    except OSError:
        pass  # a filesystem without permissions: nothing to fix


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary file lives in the destination directory so the final
    ``os.replace`` is atomic. On any exception the temporary file is removed
    and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _as_created(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True, replaces: Iterable[str] | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; move it onto ``path`` on success.

    An existing ``path`` is replaced only once the new contents are complete
    (and only when ``overwrite``; otherwise ``FileExistsError``). ``replaces``:
    the names (glob patterns) this output may hold; an existing directory
    holding anything else is refused before any work, so that ``--out`` aimed
    at an input (a fit directory) or at a folder of other files never deletes
    them. ``None`` replaces whatever is there.
    """
    path = Path(path).absolute()  # "." has no name to put the temporary directory beside
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another output or allow overwriting")
    if replaces is not None:
        check_replaceable(path, replaces)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _as_created(tmp, 0o777)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # the previous contents back where they were
                raise
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def strict_json(value, **kwargs) -> str:
    """``json.dumps`` that other tools' strict parsers read: NaN and infinities become ``null``, numpy scalars numbers."""

    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        if isinstance(v, np.ndarray):
            return clean(v.tolist())
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    return json.dumps(clean(value), allow_nan=False, **kwargs)


def check_replaceable(path: str | os.PathLike, replaces: Iterable[str]) -> None:
    """Raise :class:`~bayescirc.errors.BayescircError` unless ``path`` is absent, empty, or holds only ``replaces``."""
    from .errors import BayescircError

    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise BayescircError(f"{path} is a file, not an output directory; choose another output directory.")
    patterns = tuple(replaces)
    foreign = sorted(p.name for p in path.iterdir() if not any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise BayescircError(f"{path} holds {shown}, which this command does not write; it would replace the whole "
                             "directory. Choose a new or empty output directory (or remove those first).")
