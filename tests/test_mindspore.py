"""MindSpore .ckpt reading/writing without MindSpore (scfm.io._mindspore)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from conftest import fixture_dir
from scfm.errors import CheckpointFormatError
from scfm.io import MindSporeCheckpoint, read_mindspore_checkpoint, write_mindspore_checkpoint
from scfm.io._mindspore import _len_field, _varint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_fixture_checkpoint_index_and_byte_exact_rewrite(tmp_path):
    path = fixture_dir("cellfm") / "checkpoint" / "CellFM_80M_weight.ckpt"
    ckpt = MindSporeCheckpoint(path)
    assert ckpt.shape("gene_emb") == (408, 64)
    assert ckpt.shape("encoder.1.post_norm2.gamma") == (64,)
    assert ckpt.entry("gene_emb").tensor_type == "Float32"
    assert "moment1.gene_emb" in ckpt and "global_step" in ckpt
    assert float(ckpt["gene_emb"][0].abs().sum()) == 0.0  # padding row
    # Writing everything back gives the MindSpore-written file byte for byte.
    out = write_mindspore_checkpoint({k: ckpt[k] for k in ckpt}, tmp_path / "copy.ckpt")
    assert _md5(out) == _md5(path) == "18fea795ed647c75822689186c9062be"


def test_round_trip_dtypes_and_scalars(tmp_path):
    tensors = {
        "w": torch.randn(3, 4),
        "h": torch.randn(5).half(),
        "b": torch.randn(2, 2).to(torch.bfloat16),
        "i": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "step": torch.tensor(7, dtype=torch.int64),
        "flag": torch.tensor([True, False]),
    }
    path = write_mindspore_checkpoint(tensors, tmp_path / "t.ckpt")
    back = read_mindspore_checkpoint(path)
    assert list(back) == list(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k], v)
    only = read_mindspore_checkpoint(path, keep=lambda name, shape: len(shape) == 2, copy=True)
    assert set(only) == {"w", "b", "i"}


def _value_record(tag: str, dims, tensor_type: str, raw: bytes, packed: bool = False) -> bytes:
    if packed:
        dims_field = _len_field(1, b"".join(_varint(d) for d in dims))
    else:
        dims_field = b"".join(_varint(1 << 3) + _varint(d) for d in dims)
    tensor = dims_field + _len_field(2, tensor_type.encode()) + _len_field(3, raw)
    return _len_field(1, _len_field(1, tag.encode()) + _len_field(2, tensor))


def test_sliced_tensor_and_packed_dims_are_joined(tmp_path):
    # MindSpore writes tensors above its slice size as consecutive records with one tag.
    full = np.arange(24, dtype=np.float32).reshape(6, 4)
    parts = np.array_split(full, 3)
    data = b"".join(_value_record("big", (6, 4), "Float32", p.tobytes()) for p in parts)
    data += _value_record("packed", (2, 3), "Int64", np.arange(6).astype("<i8").tobytes(), True)
    path = tmp_path / "sliced.ckpt"
    path.write_bytes(data)
    ckpt = MindSporeCheckpoint(path)
    assert len(ckpt.entry("big").chunks) == 3
    np.testing.assert_array_equal(ckpt["big"].numpy(), full)
    np.testing.assert_array_equal(ckpt["packed"].numpy(), np.arange(6).reshape(2, 3))


def test_corrupt_files_fail_loudly(tmp_path):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="empty"):
        MindSporeCheckpoint(empty)
    good = write_mindspore_checkpoint({"w": torch.ones(10, 10)}, tmp_path / "good.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:-17])
    with pytest.raises(CheckpointFormatError, match="download it again"):
        MindSporeCheckpoint(truncated)
    wrong_size = tmp_path / "size.ckpt"
    wrong_size.write_bytes(_value_record("w", (3, 3), "Float32", b"\0" * 8))
    with pytest.raises(CheckpointFormatError, match="bytes"):
        MindSporeCheckpoint(wrong_size)
    text = tmp_path / "text.ckpt"
    text.write_bytes(b"this is not a protobuf file at all\n")
    with pytest.raises(CheckpointFormatError):
        MindSporeCheckpoint(text)


def test_tensors_are_views_of_the_file_mapping(tmp_path):
    path = write_mindspore_checkpoint({"w": torch.arange(4.0)}, tmp_path / "v.ckpt")
    before = path.read_bytes()
    ckpt = MindSporeCheckpoint(path)
    t = ckpt["w"]
    t += 1  # copy-on-write mapping: writable, the file is untouched
    assert torch.equal(ckpt["w"], torch.arange(4.0) + 1)
    assert path.read_bytes() == before
