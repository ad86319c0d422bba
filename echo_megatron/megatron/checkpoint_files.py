"""A torch_dist checkpoint directory checked from its files alone (no tensor is read): every data file its
`.metadata` points into is there, holds the bytes it must, and holds at each item's place the `torch.save`
archive torch.distributed.checkpoint will load. A checkpoint cut off while being written, truncated since, or
overwritten with other bytes fails here naming the file, instead of deep inside torch.distributed.checkpoint.

The archives' structure (zip directory, record headers, the pickle and small records with their CRC-32) is
read; a tensor's own bytes are not (torch.load does not check them either)."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path


class CheckpointFilesError(ValueError):
    """A checkpoint directory whose files cannot hold what its metadata describes (the message names the file)."""


class _ItemView(io.RawIOBase):
    """Bytes [offset, offset + length) of an open binary `stream`, seekable as a file of their own."""

    def __init__(self, stream, offset: int, length: int):
        super().__init__()
        self._stream, self._offset, self._length, self._position = stream, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._length}[whence]
        self._position = min(max(base + position, 0), self._length)
        return self._position

    def readinto(self, buffer) -> int:
        size = min(len(buffer), self._length - self._position)
        self._stream.seek(self._offset + self._position)
        read = self._stream.readinto(memoryview(buffer)[:size])
        self._position += read
        return read


def _is_tensor_bytes(record: str) -> bool:
    """A torch.save record holding a storage's bytes (`archive/data/0`), not read by the check."""
    folder, _, name = record.rpartition("/")
    return folder.endswith("data") and not folder.endswith(".data") and name.isdigit()


def _check_archive(item: _ItemView) -> None:
    """Raise `zipfile.BadZipFile` (or OSError) unless `item` is a torch.save archive whose directory and record
    headers are intact and whose non-tensor records match their CRC-32."""
    with zipfile.ZipFile(item) as archive:
        for record in archive.infolist():
            with archive.open(record) as opened:  # checks the record's local header
                if not _is_tensor_bytes(record.filename):
                    opened.read()  # checks its CRC-32


def check_torch_dist_files(directory) -> None:
    """Raise `CheckpointFilesError` naming the first missing, unreadable, short or corrupted file of the
    torch_dist checkpoint in `directory` (an `iter_NNNNNNN` or `release` directory)."""
    from torch.distributed.checkpoint import FileSystemReader

    directory = Path(directory)
    metadata_file = directory / ".metadata"
    if not metadata_file.is_file():
        raise CheckpointFilesError(f"{metadata_file}: missing (not a complete torch_dist checkpoint)")
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as error:  # pickle, EOF, ... from a truncated or overwritten .metadata
        raise CheckpointFilesError(f"{metadata_file}: unreadable ({type(error).__name__}: {error})") from error
    items_by_file: dict[str, list] = {}
    for index, info in (metadata.storage_data or {}).items():
        items_by_file.setdefault(info.relative_path, []).append((index.fqn, info))
    for name, items in sorted(items_by_file.items()):
        data_file = directory / name
        if not data_file.is_file():
            raise CheckpointFilesError(f"{data_file}: missing (the checkpoint's .metadata refers to it)")
        size = max(info.offset + info.length for _, info in items)
        if data_file.stat().st_size < size:
            raise CheckpointFilesError(f"{data_file}: truncated ({data_file.stat().st_size} bytes; the checkpoint's "
                                       f".metadata needs at least {size})")
        with open(data_file, "rb") as stream:
            for fqn, info in items:
                if info.transform_descriptors:  # stored through an extension (e.g. compressed): not a bare archive
                    continue
                try:
                    _check_archive(_ItemView(stream, info.offset, info.length))
                except (zipfile.BadZipFile, OSError, EOFError) as error:
                    raise CheckpointFilesError(
                        f"{data_file}: corrupted (bytes {info.offset}..{info.offset + info.length} should hold "
                        f"{fqn!r} as torch.save wrote it: {error})") from error
