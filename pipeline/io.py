"""The one place paths are opened: every URL (local, s3://, gs://, memory://, ...) goes
through fsspec with optional ``storage_options``.

Writes are atomic: a whole object is published under its final name or nothing is.
Local files are written to a temporary name in the same directory and renamed; object
stores get the complete bytes in one PUT (``fs.pipe_file``), so a crash mid-write never
leaves a partial object under the final name (fsspec/pyarrow streams would upload what
they have when a ``with`` block raises).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
import weakref
from collections.abc import Iterable
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from pipeline.errors import StorageError as StorageError  # defined there; imported from here too


def _why(err: BaseException) -> str:
    """An error and the errors that caused it, e.g. ``OSError: [Errno 16] Slow down
    (ClientError: An error occurred (SlowDown) when calling the PutObject operation
    (reached max retries: 4): Slow down)``: clients such as s3fs translate errors and
    the operation, the server's error code and the retry count are in the cause."""
    parts: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen and len(parts) < 3:
        seen.add(id(cur))
        text = f"{type(cur).__name__}: {cur}" if str(cur) else type(cur).__name__
        if not any(str(cur) and str(cur) in p for p in parts):
            parts.append(text)
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    return parts[0] + "".join(f" ({p})" for p in parts[1:])


# Filesystems this process opened (keyed by id: instances with equal tokens compare
# equal). A forked child (a DataLoader worker) gets fresh instances from fsspec, which
# drops the inherited ones from its cache; when the child's garbage collector then
# finalizes one, s3fs closes the parent's aiohttp session from the child, on the child's
# event loop ("Task exception was never retrieved ... attached to a different loop" from
# every worker) and over sockets the parent still uses. So a forked child keeps what it
# inherited alive, and never closes it.
_opened: weakref.WeakValueDictionary[int, fsspec.AbstractFileSystem] = weakref.WeakValueDictionary()
_forking: list[fsspec.AbstractFileSystem] = []
_inherited: list[fsspec.AbstractFileSystem] = []


def _before_fork() -> None:
    _forking[:] = _opened.values()


def _after_fork_in_parent() -> None:
    _forking.clear()


def _after_fork_in_child() -> None:
    _inherited.extend(_forking)
    _forking.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


def filesystem(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URL."""
    try:
        fs, path = url_to_fs(url, **(storage_options or {}))
    except Exception as err:  # unknown protocol, missing driver, bad options
        raise StorageError(f"cannot open {url!r}: {_why(err)}") from err
    _opened[id(fs)] = fs
    return fs, path


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def expand(paths: Iterable[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Expand globs and directories into a sorted list of file URLs (protocol kept)."""
    out: list[str] = []
    for url in paths:
        fs, path = filesystem(url, storage_options)
        proto = url.split("://", 1)[0] + "://" if "://" in url else ""
        try:
            if any(ch in path for ch in "*?["):
                found = sorted(fs.glob(path))
            elif fs.isdir(path):
                found = sorted(
                    p for p in fs.find(path) if not os.path.basename(p).startswith((".", "_"))
                )
            elif fs.exists(path):
                found = [path]
            else:
                raise StorageError(f"input {url!r} does not exist")
        except StorageError:
            raise
        except Exception as err:
            raise StorageError(f"cannot list {url!r}: {_why(err)}") from err
        if not found:
            raise StorageError(f"input {url!r} matches no file")
        out.extend(proto + p if proto and not p.startswith(proto) else p for p in found)
    return out


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as err:
        raise StorageError(f"{url!r} does not exist") from err
    except Exception as err:
        raise StorageError(f"cannot read {url!r}: {_why(err)}") from err


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    try:
        return bool(fs.exists(path))
    except Exception as err:
        raise StorageError(f"cannot check {url!r}: {_why(err)}") from err


def write_bytes_atomic(
    url: str, data: bytes, storage_options: dict[str, Any] | None = None
) -> None:
    """Publish ``data`` under ``url`` whole, or not at all."""
    fs, path = filesystem(url, storage_options)
    try:
        if _is_local(fs):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            parent = path.rsplit("/", 1)[0]
            if parent and hasattr(fs, "makedirs"):
                # object stores have no directories; the PUT below decides
                with contextlib.suppress(Exception):
                    fs.makedirs(parent, exist_ok=True)
            fs.pipe_file(path, data)
    except Exception as err:
        raise StorageError(f"cannot write {url!r}: {_why(err)}") from err


def write_json_atomic(url: str, obj: Any, storage_options: dict[str, Any] | None = None) -> None:
    write_bytes_atomic(
        url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), storage_options
    )


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    return json.loads(read_bytes(url, storage_options))


def check_writable(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Fail fast (before any model is loaded) when the output location is unusable."""
    probe = join(url, f"_write_probe-{uuid.uuid4().hex}")
    write_bytes_atomic(probe, b"ok", storage_options)
    fs, path = filesystem(probe, storage_options)
    with contextlib.suppress(Exception):
        fs.rm_file(path)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
