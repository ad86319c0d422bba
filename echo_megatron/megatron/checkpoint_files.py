"""A torch_dist checkpoint directory checked from its files alone (no tensor is read): every data file its
`.metadata` points into is there and holds the bytes it must. A checkpoint cut off while being written, or
truncated since, fails here naming the file, instead of deep inside torch.distributed.checkpoint."""

from __future__ import annotations

from pathlib import Path


class CheckpointFilesError(ValueError):
    """A checkpoint directory whose files cannot hold what its metadata describes (the message names the file)."""


def check_torch_dist_files(directory) -> None:
    """Raise `CheckpointFilesError` naming the first missing, unreadable or short file of the torch_dist
    checkpoint in `directory` (an `iter_NNNNNNN` or `release` directory)."""
    from torch.distributed.checkpoint import FileSystemReader

    directory = Path(directory)
    metadata_file = directory / ".metadata"
    if not metadata_file.is_file():
        raise CheckpointFilesError(f"{metadata_file}: missing (not a complete torch_dist checkpoint)")
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as error:  # pickle, EOF, ... from a truncated or overwritten .metadata
        raise CheckpointFilesError(f"{metadata_file}: unreadable ({type(error).__name__}: {error})") from error
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        data_file = directory / name
        if not data_file.is_file():
            raise CheckpointFilesError(f"{data_file}: missing (the checkpoint's .metadata refers to it)")
        if data_file.stat().st_size < size:
            raise CheckpointFilesError(f"{data_file}: truncated ({data_file.stat().st_size} bytes; the checkpoint's "
                                       f".metadata needs at least {size})")
