"""Remote storage through fsspec: ``s3://``, ``gs://``, ``memory://`` … as paths.

A path with a ``scheme://`` is a URL handled by `fsspec`_ (``file://`` URLs
are plain local paths, which keep atomic renames). Files are written to a
local scratch file first (the same fast, digest-while-writing writer as for
local files) and uploaded in one piece: object stores make an uploaded object
visible only when it is complete. Reads download to a scratch file and read
that.

.. _fsspec: https://filesystem-spec.readthedocs.io
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from torchkeep.errors import MissingExtraError, UnknownProtocolError

__all__ = ["Remote", "StorageOptions", "is_url", "resolve", "scratch_dir"]

StorageOptions = Mapping[str, Any]

# the extra that installs each protocol's fsspec driver
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "adl": "azure"}
_PACKAGES = {"s3": "s3fs", "gcs": "gcsfs", "azure": "adlfs"}


def _scheme(path: str) -> str | None:
    head, sep, _ = path.partition("://")
    if not sep or not head or not all(c.isalnum() or c in "+-." for c in head):
        return None
    return head.lower()


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL for fsspec (``file://`` URLs are local paths, so not)."""
    if not isinstance(path, str):
        return False
    scheme = _scheme(path)
    return scheme is not None and scheme != "file"


@dataclass(frozen=True)
class Remote:
    """A location on an fsspec filesystem.

    Attributes:
        fs: the fsspec filesystem.
        path: the path on it, without the protocol (``bucket/run/step-1``).
        url: the URL the user gave, or one joined from it.
    """

    fs: Any
    path: str
    url: str

    def join(self, *parts: str) -> Remote:
        """The location of ``parts`` under this one."""
        return Remote(self.fs, posixpath.join(self.path, *parts), posixpath.join(self.url, *parts))

    @property
    def name(self) -> str:
        """The last part of the path."""
        return posixpath.basename(self.path.rstrip("/"))

    def __str__(self) -> str:
        return self.url

    def upload(self, local: Path) -> None:
        """Copy a local file here (one object, visible when complete on object stores)."""
        parent = posixpath.dirname(self.path)
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        self.fs.put_file(str(local), self.path)

    def download(self, local: Path) -> None:
        """Copy this file to ``local``."""
        self.fs.get_file(self.path, str(local))

    def files(self) -> dict[str, int]:
        """Every file under this folder: relative path -> size (listings re-read, not cached)."""
        self.fs.invalidate_cache(self.path)
        found = self.fs.find(self.path, detail=True, withdirs=False)
        prefix = self.path.rstrip("/") + "/"
        return {
            str(name)[len(prefix) :]: int(info["size"])
            for name, info in found.items()
            if str(name).startswith(prefix)
        }

    def download_tree(self, local: Path) -> None:
        """Copy every file under this folder into the local folder ``local``."""
        for relative in self.files():
            target = local / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            self.join(relative).download(target)

    def exists(self) -> bool:
        """Whether something is stored here (listings are re-read, not cached)."""
        self.fs.invalidate_cache(self.path)
        return bool(self.fs.exists(self.path))


def resolve(path: str | os.PathLike[str], storage_options: StorageOptions | None = None) -> Path | Remote:
    """A local :class:`~pathlib.Path`, or a :class:`Remote` for a URL.

    Args:
        path (str | PathLike): a local path, a ``file://`` URL, or any URL fsspec knows.
        storage_options (Mapping | None, default None): passed to the fsspec
            filesystem (credentials, ``endpoint_url``, …); without them fsspec
            reads its usual configuration (environment, config files).

    Raises:
        MissingExtraError: fsspec, or the driver of the URL's protocol, is not installed.
        UnknownProtocolError: fsspec knows no such protocol.
        ValueError: ``storage_options`` with a local path.
    """
    if not is_url(path):
        if storage_options:
            raise ValueError(f"storage_options only apply to URLs (s3://…), not to the local path {path!s}")
        text = os.fspath(path)
        if isinstance(text, str) and _scheme(text) == "file":
            return Path(unquote(urlsplit(text).path))
        return Path(text)
    url = str(path)
    scheme = _scheme(url) or ""
    try:
        import fsspec
    except ImportError as err:
        raise MissingExtraError("fsspec", _EXTRAS.get(scheme, "remote")) from err
    try:
        fs, inner = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as err:
        extra = _EXTRAS.get(scheme, "remote")
        raise MissingExtraError(_PACKAGES.get(extra, f"the fsspec driver for {scheme}://"), extra) from err
    except ValueError as err:
        if "protocol" not in str(err).lower():
            raise
        raise UnknownProtocolError(url, scheme) from err
    return Remote(fs, inner.rstrip("/") or inner, url.rstrip("/"))


@contextlib.contextmanager
def scratch_dir(prefix: str = "torchkeep-") -> Iterator[Path]:
    """A private local folder for staging uploads and downloads, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
