"""One blosc2 frame of a tensor record, decompressed whole or a slice at a time.

A frame is what ``blosc2.compress2`` returns: a header stating the decompressed
size, the compressed size and the item size, then compressed blocks. The header is
checked against the record before anything is decompressed.

Reading a slice of a large frame decompresses only the blocks that hold it, so a
tensor can be decoded without a buffer for all its values. blosc2 reads part of a
frame only from inside a super-chunk, so a large frame is copied into one on its
first slice read: one copy of the compressed bytes, alive as long as the ``Frame``.
A frame of at most ``_WHOLE_BYTES`` is decompressed whole instead, once.
"""

from __future__ import annotations

import blosc2
import numpy as np

from proto._errors import CodecError

__all__ = ["Frame"]

_WHOLE_BYTES = 4 << 20
_TYPESIZE_AT = 3  # header byte that holds the frame's item size


class Frame:
    """A blosc2 frame whose sizes match its record."""

    def __init__(self, data: bytes | memoryview, *, nbytes: int, typesize: int, name: str) -> None:
        try:
            declared, cbytes, _blocksize = blosc2.get_cbuffer_sizes(data)
        except Exception as exc:
            raise CodecError(f"tensor {name!r}: not a blosc2 frame ({exc})") from exc
        if declared != nbytes:
            raise CodecError(
                f"tensor {name!r}: blosc2 frame holds {declared} bytes, expected {nbytes}"
            )
        if cbytes != len(data):
            raise CodecError(
                f"tensor {name!r}: blosc2 frame is {len(data)} bytes, its header says {cbytes}"
            )
        # blosc2 counts a slice in the super-chunk's items but reads it in the frame's:
        # a frame with a larger item size would be written past the end of the slice.
        if data[_TYPESIZE_AT] != typesize:
            raise CodecError(
                f"tensor {name!r}: blosc2 frame has item size {data[_TYPESIZE_AT]}, "
                f"expected {typesize}"
            )

        self._data = data
        self._nbytes = nbytes
        self._typesize = typesize
        self._name = name
        self._whole: np.ndarray | None = None
        self._chunks: blosc2.SChunk | None = None

    def read(self, start: int, stop: int, into: np.ndarray) -> None:
        """Decompress bytes ``start`` to ``stop`` into ``into``, a contiguous array of that size.

        ``start`` and ``stop`` are multiples of the record's item size.
        """
        if start == 0 and stop == self._nbytes:
            self._decompress(into)
        elif self._nbytes <= _WHOLE_BYTES:
            into.reshape(-1).view(np.uint8)[...] = self.view(start, stop)
        else:
            self._read_slice(start, stop, into)

    def view(self, start: int, stop: int) -> np.ndarray:
        """Bytes ``start`` to ``stop`` as a read-only uint8 array.

        A frame of at most ``_WHOLE_BYTES`` is decompressed once and every view shares
        that buffer; a larger one gives a new array per call.
        """
        if self._nbytes > _WHOLE_BYTES:
            out = np.empty(stop - start, np.uint8)
            self.read(start, stop, out)
            return out
        if self._whole is None:
            self._whole = np.empty(self._nbytes, np.uint8)
            self._decompress(self._whole)
            self._whole.flags.writeable = False
        return self._whole[start:stop]

    def _decompress(self, into: np.ndarray) -> None:
        try:
            blosc2.decompress2(self._data, dst=into)
        except Exception as exc:
            raise CodecError(f"tensor {self._name!r}: blosc2 data is corrupt ({exc})") from exc

    def _read_slice(self, start: int, stop: int, into: np.ndarray) -> None:
        if self._chunks is None:
            self._chunks = self._super_chunk()
        try:
            self._chunks.get_slice(start // self._typesize, stop // self._typesize, out=into)
        except Exception as exc:
            raise CodecError(f"tensor {self._name!r}: blosc2 data is corrupt ({exc})") from exc

    def _super_chunk(self) -> blosc2.SChunk:
        try:
            chunks = blosc2.SChunk(
                chunksize=self._nbytes, cparams=blosc2.CParams(typesize=self._typesize)
            )
            chunks.append_chunk(self._data)
        except Exception as exc:
            raise CodecError(f"tensor {self._name!r}: blosc2 data is corrupt ({exc})") from exc
        return chunks
