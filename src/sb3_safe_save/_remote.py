"""URL paths: save, load, audit and inspect through fsspec (``s3://``, ``gs://``, ``memory://``, ...).

A ``str`` with ``://`` is a URL; ``file://`` URLs become plain local paths and keep the local path
(unbuffered ``readinto`` straight into the model's memory, temporary file + fsync + ``os.replace``).
fsspec is imported only when a URL is used; it comes with the ``remote`` extra
(``pip install "sb3-safe-save[remote]"``, which adds s3fs for ``s3://``; ``gs://`` needs gcsfs).

Writing: the whole file is built in memory (one copy of the file's bytes, on top of the model) and
handed to the backend as **one** upload of the final object, ``fs.pipe_file``. Nothing is uploaded until
every byte is ready, so an error while saving (an ``UnsupportedObjectError``, a bad value) never touches
the previous object. What a reader can see during the upload depends on the backend:

==============  ==========================================================================================
backend         guarantee
==============  ==========================================================================================
local, file://  temporary file in the same directory, fsync, ``os.replace``, fsync of the directory:
                a reader or a crash sees the old file or the new one, never a mix
``s3://``       one ``PutObject`` (files under 100 MiB) or a multipart upload (larger; aborted on error).
                S3 makes an object visible only when the upload completes, whole: readers see the old
                object or the new one, never a partial one. No rename is needed (S3 has none: a
                copy + delete would be slower and no safer)
``gs://``       one upload of the final object (gcsfs); GCS objects likewise become visible whole, when
                the upload finalises (not tested here)
``memory://``   one dict assignment of a new in-memory file: atomic within the process
other backends  whatever the backend's ``pipe_file`` does; a plain file system behind fsspec (sftp, ...)
                may show a partial file during the upload, which ``load`` rejects as truncated
                (``IntegrityError``) but which has replaced the old one
==============  ==========================================================================================

Reading: the object is opened ``"rb"`` (seekable) and read by the same reader as a local file: the
header first, then each tensor with one ranged read. The file object reads ahead at most
``READ_AHEAD`` bytes past each request, so a typical header takes one request and an audit (or
``read_manifest``, or ``inspect --no-sha256``) fetches the header plus at most ``READ_AHEAD`` bytes,
never the tensors of a large file.

Options such as an S3 endpoint or credentials come from fsspec's configuration, e.g.
``fsspec.config.conf["s3"] = {"endpoint_url": "http://127.0.0.1:9000"}`` or the environment variable
``FSSPEC_S3_ENDPOINT_URL``, and from the backend's own (``AWS_ACCESS_KEY_ID``, ...).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import IO, Any, TypeGuard

from sb3_safe_save import _weights
from sb3_safe_save._errors import RemoteStorageUnavailableError

READ_AHEAD = 64 * 1024
_INSTALL = 'pip install "sb3-safe-save[remote]"'


def is_url(path: object) -> TypeGuard[str]:
    """True for a ``str`` URL that fsspec must open (``s3://b/k``, ``memory://k``); False for ``file://`` and local paths.

    :param path: any path argument given to save/load/audit/inspect
    """
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def local(path: Any) -> Any:
    """``path`` with a leading ``file://`` removed (``file:///tmp/m`` -> ``/tmp/m``); anything else unchanged.

    :param path: a path, URL or file object
    """
    if isinstance(path, str) and path.startswith("file://"):
        return path[len("file://") :]
    return path


def _filesystem(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise RemoteStorageUnavailableError(f"{url}: URLs need fsspec; install it with: {_INSTALL}") from None
    try:
        return fsspec.core.url_to_fs(url)  # type: ignore[no-any-return]
    except ImportError as e:  # fsspec is there but not the backend (s3fs, gcsfs, ...)
        raise RemoteStorageUnavailableError(f"{url}: {e} (for s3:// use: {_INSTALL})") from None
    except ValueError as e:  # "Protocol not known: ..."
        raise RemoteStorageUnavailableError(f"{url[:200]}: fsspec cannot open this URL: {e}") from None


def _with_suffix(url: str) -> str:
    """The URL saved to, as for local paths: one without a suffix (or with SB3's ``.zip``/``.pkl``) gets ``.safetensors``."""
    head, _, name = url.rpartition("/")
    return f"{head}/{_weights.saved_name(name)}" if head else _weights.saved_name(name)


def write(url: str, blobs: Mapping[str, _weights.Blob], metadata: _weights.Metadata) -> None:
    """Write ``blobs`` and ``metadata`` to the object ``url`` in one upload (see the module docstring).

    :param url: the target URL (one without a suffix gets ``.safetensors``)
    :param blobs: the tensors, as ``_weights.write_atomic`` takes them
    :param metadata: the safetensors ``__metadata__`` (or the function making it from the checksums)
    """
    fs, path = _filesystem(_with_suffix(url))
    data = _weights.file_bytes(blobs, metadata)
    fs.pipe_file(path, data)


@contextlib.contextmanager
def open_read(url: str) -> Iterator[tuple[IO[bytes], int]]:
    """Open the object ``url`` for reading (seekable), as ``_persist._open`` does a local file.

    A URL without a suffix (or with SB3's ``.zip``/``.pkl``) that names no object falls back to the URL
    with ``.safetensors``, as for paths.

    :param url: the object's URL
    :return: a context manager yielding ``(file object, size in bytes)``
    """
    fs, path = _filesystem(url)
    try:
        f = fs.open(path, "rb", block_size=READ_AHEAD, cache_type="readahead")
    except FileNotFoundError:
        if _with_suffix(url) == url:
            raise
        f = fs.open(_with_suffix(path), "rb", block_size=READ_AHEAD, cache_type="readahead")
    with f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(0)
        yield f, size
