"""The folder a replay store lives in: a local path or any URI (or filesystem) pyarrow.fs understands.

Local folders get memory-mapped reads and atomic writes (temp file in the same folder, fsync,
``os.replace``, fsync of the folder). Object stores write each object whole on close, so there the
caller only has to write the manifest last.
"""

from __future__ import annotations

import os
import secrets

import pyarrow as pa
import pyarrow.fs as pafs

from clgrid.fsio import fsync_dir

TEMP_PREFIX = ".tmp-"  # unfinished writes; removable by the store's garbage collection


class StoreRoot:
    """File operations relative to one store folder."""

    def __init__(self, root: str | os.PathLike, filesystem: pafs.FileSystem | None = None):
        root = os.fspath(root)
        if filesystem is None:
            if "://" not in root:
                root = os.path.abspath(root)  # from_uri accepts absolute paths only
            filesystem, root = pafs.FileSystem.from_uri(root)
        self.fs = filesystem
        self.path = root.rstrip("/")
        self.local = isinstance(filesystem, pafs.LocalFileSystem)

    def __str__(self) -> str:
        return self.path if self.local else f"{self.fs.type_name}://{self.path}"

    def _full(self, name: str) -> str:
        return f"{self.path}/{name}"

    def names(self) -> list[str]:
        """The files in the folder (none when it does not exist yet)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def size(self, name: str) -> int | None:
        """The file's size in bytes, or None when it does not exist."""
        info = self.fs.get_file_info(self._full(name))
        return None if info.type == pafs.FileType.NotFound else int(info.size)

    def read(self, name: str) -> pa.Buffer:
        """The file's bytes: a memory map for local files (no copy), read whole otherwise."""
        if self.local:
            with pa.memory_map(self._full(name), "r") as f:
                return f.read_buffer()  # the buffer keeps the mapping alive after close
        with self.fs.open_input_file(self._full(name)) as f:
            return f.read_buffer()

    def write(self, name: str, data: bytes | pa.Buffer) -> None:
        """Writes ``data`` so that ``name`` appears whole or not at all, durably."""
        if not self.local:
            self.fs.create_dir(self.path, recursive=True)  # a no-op on object stores
            with self.fs.open_output_stream(self._full(name)) as out:
                out.write(data)
            return
        if not os.path.isdir(self.path):
            os.makedirs(self.path, exist_ok=True)
            fsync_dir(os.path.dirname(self.path))
        tmp = self._full(f"{TEMP_PREFIX}{name}-{secrets.token_hex(4)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._full(name))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        fsync_dir(self.path)  # makes the rename itself durable

    def delete(self, name: str) -> None:
        self.fs.delete_file(self._full(name))
