"""Reading ADM-format ``.npz`` batches without loading them whole.

A 50k x 256 x 256 x 3 sample batch is 9.8 GB and a 512 px one 39 GB, so ``arr_0`` is read in slices:
straight from the file at the member's offset when the member is stored (``np.savez``), or by
streaming through the zip member when it is compressed (``np.savez_compressed``).  Object arrays
are refused (nothing is ever unpickled).
"""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

PathLike = Union[str, Path]


class BatchFileError(ValueError):
    """A sample or reference ``.npz`` is missing, unreadable or does not fit the protocol."""


class SampleFileError(BatchFileError):
    """The sample batch is missing, unreadable or does not fit the protocol."""


class ReferenceFileError(BatchFileError):
    """The reference batch is missing, unreadable, not the pinned one or does not fit the track."""


class NpzArrayReader:
    """One array of an ``.npz`` read by row slices: ``reader.read(start, stop)``.

    ``error`` is the exception class raised (with the file name) when the file is not usable.
    """

    def __init__(self, path: PathLike, key: str = "arr_0", error=BatchFileError):
        self.path = Path(path)
        self.key = key
        self.error = error
        if not self.path.is_file():
            raise error(f"{self.path}: file not found")
        try:
            self._zip = zipfile.ZipFile(self.path)
            self.keys = [n[:-4] for n in self._zip.namelist() if n.endswith(".npy")]
            member = f"{key}.npy"
            if member not in self._zip.namelist():
                raise error(f"{self.path}: no {key!r} array (found {self.keys})")
            self._info = self._zip.getinfo(member)
            with self._zip.open(self._info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                self._data_offset = f.tell()
        except BatchFileError:
            raise
        except Exception as e:  # zipfile / header errors of a corrupt or truncated file
            raise error(f"{self.path}: not a readable .npz file: {e}") from e
        if dtype.hasobject:
            raise error(f"{self.path}: {key} is an object array; refusing to unpickle it")
        if fortran and len(shape) > 1:
            raise error(f"{self.path}: {key} is stored in Fortran order; save it C-contiguous")
        self.shape: Tuple[int, ...] = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._stored = self._info.compress_type == zipfile.ZIP_STORED
        self._file_offset: Optional[int] = None
        if self._stored:
            with open(self.path, "rb") as raw:
                raw.seek(self._info.header_offset)
                header = raw.read(30)
                if len(header) != 30 or header[:4] != b"PK\x03\x04":
                    raise error(f"{self.path}: corrupt zip local header for {member}")
                name_len, extra_len = struct.unpack("<HH", header[26:30])
            self._file_offset = self._info.header_offset + 30 + name_len + extra_len + self._data_offset
        expected = self._data_offset + self._row_bytes * (self.shape[0] if self.shape else 1)
        if self._info.file_size < expected:
            raise error(f"{self.path}: {key} is truncated ({self._info.file_size} bytes, "
                        f"header says {expected})")
        self._stream = None
        self._stream_pos = 0

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a C-contiguous array."""
        start, stop = max(int(start), 0), min(int(stop), len(self))
        count = max(stop - start, 0)
        nbytes = count * self._row_bytes
        try:
            if self._stored:
                with open(self.path, "rb") as raw:
                    raw.seek(self._file_offset + start * self._row_bytes)
                    buf = raw.read(nbytes)
            else:
                target = self._data_offset + start * self._row_bytes
                if self._stream is None or target < self._stream_pos:
                    if self._stream is not None:
                        self._stream.close()
                    self._stream = self._zip.open(self._info)
                    self._stream_pos = 0
                if target > self._stream_pos:
                    self._stream.seek(target)
                buf = self._stream.read(nbytes)
                self._stream_pos = target + len(buf)
        except Exception as e:
            raise self.error(f"{self.path}: reading {self.key} rows {start}:{stop} failed: {e}") from e
        if len(buf) != nbytes:
            raise self.error(f"{self.path}: {self.key} is truncated (rows {start}:{stop} incomplete)")
        return np.frombuffer(buf, dtype=self.dtype).reshape((count,) + self.shape[1:]).copy()

    def verify_checksum(self) -> None:
        """Reads the whole member once through zipfile, which checks its CRC-32 at the end. The
        slice reads above bypass that check, so without this a damaged byte would be scored."""
        try:
            with self._zip.open(self._info) as f:
                while f.read(1 << 24):
                    pass
        except zipfile.BadZipFile as e:
            raise self.error(f"{self.path}: {self.key} fails its CRC-32 check, the file is damaged "
                             f"({e})") from e
        except Exception as e:
            raise self.error(f"{self.path}: reading {self.key} for its CRC-32 check failed: {e}") from e

    def read_other(self, key: str) -> Optional[np.ndarray]:
        """A (small) other array of the same file, or None if absent; never unpickles."""
        if key not in self.keys:
            return None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                return np.asarray(data[key])
        except Exception as e:
            raise self.error(f"{self.path}: cannot read {key!r}: {e}") from e

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def open_image_batch(path: PathLike, resolution: int, channels: int = 3, num_images: Optional[int] = None,
                     error=SampleFileError, what: str = "samples") -> NpzArrayReader:
    """``arr_0`` of an ADM-format batch, checked: uint8, [N, resolution, resolution, channels], N images."""
    reader = NpzArrayReader(path, "arr_0", error=error)
    shape = reader.shape
    if reader.dtype != np.uint8:
        reader.close()
        raise error(f"{path}: arr_0 has dtype {reader.dtype}, expected uint8 (0..255)")
    if len(shape) != 4 or shape[3] != channels:
        reader.close()
        raise error(f"{path}: arr_0 has shape {shape}, expected [N, {resolution}, {resolution}, {channels}] (NHWC)")
    if shape[1:3] != (resolution, resolution):
        reader.close()
        raise error(f"{path}: {what} are {shape[1]}x{shape[2]}, the track's resolution is "
                    f"{resolution}x{resolution}")
    if num_images is not None and shape[0] != num_images:
        reader.close()
        raise error(f"{path}: {shape[0]} {what}, the protocol requires exactly {num_images} "
                    f"(metrics over other counts are not comparable)")
    if shape[0] == 0:
        reader.close()
        raise error(f"{path}: arr_0 holds no images")
    return reader
