"""Read (and write) MindSpore ``.ckpt`` checkpoints without MindSpore.

A MindSpore checkpoint is one serialised protobuf message
(``mindspore/ccsrc/utils/checkpoint.proto``)::

    message Checkpoint {
      message Value {
        required string tag = 1;            // parameter name
        oneof value {
          TensorProto tensor = 2;
          MapTensorProto maptensor = 3;     // embedding hash maps, not used by scfm models
        }
      }
      repeated Value value = 1;
    }
    message TensorProto {
      repeated int64 dims = 1;              // empty for scalars
      required string tensor_type = 2;      // "Float32", "Float16", "Int32", ...
      required bytes tensor_content = 3;    // raw little-endian bytes, C order
    }

MindSpore writes tensors larger than 512 MiB as several consecutive ``Value`` records with the
same tag, each holding the full ``dims`` and one slice of the bytes; they are joined here.

The reader walks the wire format directly over a memory map of the file: it records where
each tensor's bytes are (an index of a few hundred entries) and turns only the requested
entries into tensors. Single-record tensors are zero-copy views of the (copy-on-write)
mapping, so reading the model parameters of the 9.7 GB 800M release touches only their pages
and never holds the optimizer moments in memory.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scfm.errors import CheckpointFormatError, InvalidInputError
from scfm.io._common import resolve_local_path

logger = logging.getLogger(__name__)

__all__ = [
    "MindSporeCheckpoint",
    "MindSporeEntry",
    "read_mindspore_checkpoint",
    "write_mindspore_checkpoint",
]

#: MindSpore ``tensor_type`` strings and the torch dtype of their raw bytes.
MINDSPORE_DTYPES: dict[str, torch.dtype] = {
    "Float16": torch.float16,
    "BFloat16": torch.bfloat16,
    "Float32": torch.float32,
    "Float64": torch.float64,
    "Int8": torch.int8,
    "Int16": torch.int16,
    "Int32": torch.int32,
    "Int64": torch.int64,
    "UInt8": torch.uint8,
    "Bool": torch.bool,
}
_TYPE_OF_DTYPE = {v: k for k, v in MINDSPORE_DTYPES.items()}

# Protobuf wire types.
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


@dataclass
class MindSporeEntry:
    """Where one tensor of a MindSpore checkpoint lies in the file.

    Attributes
    ----------
    name
        The parameter name (``tag``).
    shape
        The tensor's dims (``()`` for scalars).
    tensor_type
        MindSpore type string, e.g. ``"Float32"``.
    chunks
        ``(offset, nbytes)`` of each slice of ``tensor_content`` in the file, in order.
    """

    name: str
    shape: tuple[int, ...]
    tensor_type: str
    chunks: list[tuple[int, int]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Total number of content bytes."""
        return sum(n for _, n in self.chunks)

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of the content."""
        return MINDSPORE_DTYPES[self.tensor_type]


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; return ``(value, new position)``."""
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise CheckpointFormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise CheckpointFormatError("varint longer than 64 bits")


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(field number, wire type, value or payload offset, payload length)``.

    For varints the third item is the value and the length is 0; for length-delimited
    fields it is the payload's offset. Fixed-width fields are skipped over.
    """
    pos = start
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos, end)
            yield number, wire, value, 0
        elif wire == _LEN:
            length, pos = _read_varint(buf, pos, end)
            if pos + length > end:
                raise CheckpointFormatError("length-delimited field runs past its message")
            yield number, wire, pos, length
            pos += length
        elif wire == _FIXED64:
            pos += 8
        elif wire == _FIXED32:
            pos += 4
        else:
            raise CheckpointFormatError(f"unsupported protobuf wire type {wire}")
    if pos != end:
        raise CheckpointFormatError("message runs past its end")


def _parse_tensor(buf, start: int, end: int) -> tuple[tuple[int, ...], str, int, int]:
    dims: list[int] = []
    tensor_type = ""
    content = (start, 0)
    for number, wire, value, length in _fields(buf, start, end):
        if number == 1 and wire == _VARINT:
            dims.append(value)
        elif number == 1 and wire == _LEN:  # packed encoding of the repeated int64
            pos, stop = value, value + length
            while pos < stop:
                dim, pos = _read_varint(buf, pos, stop)
                dims.append(dim)
        elif number == 2 and wire == _LEN:
            tensor_type = bytes(buf[value : value + length]).decode("utf-8")
        elif number == 3 and wire == _LEN:
            content = (value, length)
    return tuple(dims), tensor_type, content[0], content[1]


class MindSporeCheckpoint(Mapping[str, torch.Tensor]):
    """A lazily read MindSpore ``.ckpt`` file: a read-only mapping name -> tensor.

    Opening the file builds an index of the tensors (names, shapes, types, byte offsets)
    without reading their contents. ``ckpt[name]`` returns a tensor; entries that MindSpore
    stored in one record are zero-copy views of a copy-on-write memory map (writing to them
    never touches the file).

    Parameters
    ----------
    path
        The ``.ckpt`` file.

    Raises
    ------
    CheckpointFormatError
        If the file is empty, truncated, not a MindSpore checkpoint, or holds a tensor whose
        byte count does not match its dims and type.

    Examples
    --------
    >>> ckpt = MindSporeCheckpoint("CellFM_80M_weight.ckpt")  # doctest: +SKIP
    >>> ckpt.shape("gene_emb")  # doctest: +SKIP
    (27856, 1536)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = resolve_local_path(path)
        if self.path.is_dir():
            raise InvalidInputError(
                f"{str(self.path)!r} is a directory; pass the MindSpore .ckpt file inside it."
            )
        size = self.path.stat().st_size
        if size == 0:
            raise CheckpointFormatError(
                f"Checkpoint file {str(self.path)!r} is empty (0 bytes). The download was "
                "probably interrupted: download it again."
            )
        with open(self.path, "rb") as fh:
            # ACCESS_COPY: pages are shared with the page cache until written to; tensors
            # built on it are writable without ever modifying the file.
            self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            self._entries = self._index()
        except CheckpointFormatError as err:
            raise CheckpointFormatError(
                f"{str(self.path)!r} is not a readable MindSpore checkpoint ({err}). The file "
                "is truncated, corrupted or of another format: download it again."
            ) from None

    def _index(self) -> dict[str, MindSporeEntry]:
        buf = self._mmap
        entries: dict[str, MindSporeEntry] = {}
        previous: str | None = None
        for number, wire, start, length in _fields(buf, 0, len(buf)):
            if number != 1 or wire != _LEN:
                continue  # unknown top-level fields (e.g. checksums) carry no tensors
            tag = None
            tensor = None
            for sub_number, sub_wire, value, sub_len in _fields(buf, start, start + length):
                if sub_number == 1 and sub_wire == _LEN:
                    tag = bytes(buf[value : value + sub_len]).decode("utf-8")
                elif sub_number == 2 and sub_wire == _LEN:
                    tensor = (value, value + sub_len)
            if tag is None:
                raise CheckpointFormatError("a value record has no tag")
            if tensor is None:
                logger.debug("Skipping non-tensor record %r (map tensor).", tag)
                previous = None
                continue
            dims, tensor_type, offset, nbytes = _parse_tensor(buf, *tensor)
            if tensor_type not in MINDSPORE_DTYPES:
                raise CheckpointFormatError(f"tensor {tag!r} has unsupported type {tensor_type!r}")
            if tag == previous:  # a further slice of a tensor larger than MindSpore's slice size
                entries[tag].chunks.append((offset, nbytes))
            else:
                if tag in entries:
                    raise CheckpointFormatError(f"tensor {tag!r} occurs twice")
                entries[tag] = MindSporeEntry(tag, dims, tensor_type, [(offset, nbytes)])
            previous = tag
        if not entries:
            raise CheckpointFormatError("no tensors found")
        for entry in entries.values():
            expected = math.prod(entry.shape) * entry.dtype.itemsize
            if entry.nbytes != expected:
                raise CheckpointFormatError(
                    f"tensor {entry.name!r} has {entry.nbytes} bytes but dims {entry.shape} "
                    f"of {entry.tensor_type} need {expected}"
                )
        return entries

    # Mapping interface -------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        count = math.prod(entry.shape)
        if count == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        if len(entry.chunks) == 1:
            offset, _ = entry.chunks[0]
            flat = torch.frombuffer(self._mmap, dtype=entry.dtype, count=count, offset=offset)
        else:
            flat = torch.cat(
                [
                    torch.frombuffer(
                        self._mmap, dtype=entry.dtype, count=n // entry.dtype.itemsize, offset=o
                    )
                    for o, n in entry.chunks
                ]
            )
        return flat.reshape(entry.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, name: str) -> MindSporeEntry:
        """The index entry (shape, type, byte ranges) of ``name``."""
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """The dims of tensor ``name`` (read from the index, no data is touched)."""
        return self._entries[name].shape

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Dims of every tensor, by name."""
        return {k: e.shape for k, e in self._entries.items()}

    def __repr__(self) -> str:
        return f"MindSporeCheckpoint({str(self.path)!r}, {len(self)} tensors)"


def read_mindspore_checkpoint(
    path: str | os.PathLike,
    *,
    keep: Callable[[str, tuple[int, ...]], bool] | None = None,
    copy: bool = False,
) -> dict[str, torch.Tensor]:
    """Read the tensors of a MindSpore ``.ckpt`` file into a dict, without MindSpore.

    Parameters
    ----------
    path
        The ``.ckpt`` file.
    keep
        ``keep(name, shape) -> bool`` selects the entries to read (e.g. to drop optimizer
        state such as ``moment1.*``); ``None`` reads all. Unselected entries are never read.
    copy
        Return tensors that own their memory instead of views of the memory-mapped file.

    Returns
    -------
    Parameter name -> tensor, in file order.

    Raises
    ------
    CheckpointFormatError
        If the file is not a readable MindSpore checkpoint.
    """
    ckpt = MindSporeCheckpoint(path)
    out: dict[str, torch.Tensor] = {}
    for name in ckpt:
        if keep is None or keep(name, ckpt.shape(name)):
            tensor = ckpt[name]
            out[name] = tensor.clone() if copy else tensor
    return out


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | _LEN) + _varint(len(payload)) + payload


def write_mindspore_checkpoint(
    tensors: Mapping[str, torch.Tensor | np.ndarray], path: str | os.PathLike
) -> Path:
    """Write tensors as a MindSpore ``.ckpt`` file (as ``mindspore.save_checkpoint`` does).

    Used to export weights for the original code and to build test files.

    Parameters
    ----------
    tensors
        Parameter name -> tensor (any dtype in :data:`MINDSPORE_DTYPES`).
    path
        Output file.

    Returns
    -------
    The written path.
    """
    path = Path(path)
    with open(path, "wb") as fh:
        for name, value in tensors.items():
            t = torch.as_tensor(value).detach().cpu().contiguous()
            if t.dtype not in _TYPE_OF_DTYPE:
                raise InvalidInputError(
                    f"tensor {name!r} has dtype {t.dtype} with no MindSpore type."
                )
            tensor = b"".join(_varint((1 << 3) | _VARINT) + _varint(int(d)) for d in t.shape)
            tensor += _len_field(2, _TYPE_OF_DTYPE[t.dtype].encode())
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            tensor += _len_field(3, raw)
            value_msg = _len_field(1, name.encode()) + _len_field(2, tensor)
            fh.write(_len_field(1, value_msg))
    return path
