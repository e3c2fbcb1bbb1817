"""Safe and strict checkpoint primitives."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from conftest import needs_smaps, resident_bytes
from scfm.errors import (
    CheckpointFormatError,
    CheckpointKeyError,
    CheckpointNotFoundError,
    UnsafeCheckpointError,
)
from scfm.io import (
    load_pickle_dict,
    load_safetensors_file,
    load_state_dict_strict,
    load_torch_file,
    resolve_local_path,
)


class _Payload:
    """Unpickling this runs code (writes a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_torch_file_with_objects_needs_consent(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"weights": torch.ones(2), "config": _Config()}, path)
    with pytest.raises(UnsafeCheckpointError, match="trust_checkpoint=True"):
        load_torch_file(path)
    loaded = load_torch_file(path, trust_checkpoint=True)
    assert torch.equal(loaded["weights"], torch.ones(2))


class _Config:
    pass


def test_code_executing_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"x": _Payload(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError):
        load_torch_file(path)
    assert not marker.exists()
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(pickle.dumps({"a": _Payload(str(marker))}))
    with pytest.raises(CheckpointFormatError, match="plain pickled dictionary"):
        load_pickle_dict(pkl)
    assert not marker.exists()


def test_empty_truncated_and_missing_files(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="empty"):
        load_torch_file(empty)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(100, 100)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        load_torch_file(cut)
    with pytest.raises(CheckpointFormatError, match="safetensors"):
        load_safetensors_file(cut)
    with pytest.raises(CheckpointNotFoundError):
        resolve_local_path(tmp_path / "nope")
    notdict = tmp_path / "list.pkl"
    notdict.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(CheckpointFormatError, match="not a dict"):
        load_pickle_dict(notdict)


@pytest.mark.parametrize("zip_format", [True, False])
def test_damaged_torch_files_are_format_errors(tmp_path, zip_format):
    """Random damage surfaces from torch's unpickler as many exception types; every one is
    reported as a damaged file, never as an unsafe one (which would invite trust_checkpoint)."""
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(8, 8)}, good, _use_new_zipfile_serialization=zip_format)
    data = good.read_bytes()
    rng = np.random.default_rng(0)
    for i in range(60):
        damaged = bytearray(data)
        damaged[:64] = rng.bytes(64)
        path = tmp_path / f"damaged{i}.pt"
        path.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointFormatError, match="corrupted") as info:
            load_torch_file(path)
        assert not isinstance(info.value, UnsafeCheckpointError)


def test_strict_loading_reports_every_problem():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = {
        "0.weight": torch.zeros(4, 3),
        "0.bias": torch.zeros(5),  # mis-shaped
        "extra.weight": torch.zeros(1),  # unexpected
        "position_ids": torch.zeros(1),  # ignored
    }  # 1.weight and 1.bias missing
    with pytest.raises(CheckpointKeyError) as info:
        load_state_dict_strict(module, state, ignore_unexpected=["position_ids"])
    err = info.value
    assert err.missing == ["1.bias", "1.weight"]
    assert err.unexpected == ["extra.weight"]
    assert err.mismatched == [("0.bias", (5,), (4,))]
    assert "position_ids" not in str(err)
    good = {k: torch.full_like(v, 2.0) for k, v in module.state_dict().items()}
    load_state_dict_strict(module, good)
    assert torch.all(module[1].bias == 2.0)


class _WithDerived(torch.nn.Module):
    """A weight from the file plus a buffer computed in ``__init__`` (not saved)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.register_buffer("freqs", torch.arange(3.0), persistent=False)


def test_assign_into_a_meta_module_takes_the_tensors_and_names_what_is_left_unset():
    weights = {"lin.weight": torch.randn(2, 2), "lin.bias": torch.randn(2)}
    with torch.device("meta"):
        module = torch.nn.Linear(2, 2)
    load_state_dict_strict(module, {k[4:]: v for k, v in weights.items()}, assign=True)
    assert module.weight.data_ptr() == weights["lin.weight"].data_ptr()  # held once
    with torch.device("meta"):
        derived = _WithDerived()
    with pytest.raises(CheckpointFormatError, match="freqs"):
        load_state_dict_strict(derived, weights, what="w.pt", assign=True)


def test_windowed_finite_check_of_a_mapped_file_names_every_bad_tensor(tmp_path, monkeypatch):
    """check_finite_torch_file maps the file once per window (here a few tensors each) and
    still names every NaN / inf tensor, wherever it lies; clean files pass."""
    import scfm.io._common as common

    state = {f"layer{i}.weight": torch.randn(64, 64) for i in range(12)}
    state["step"] = torch.tensor(3)  # integer tensors are not checked
    path = tmp_path / "w.ckpt"
    torch.save({"model_state_dict": state, "epoch": 1}, path)
    monkeypatch.setattr(common, "_FINITE_WINDOW_BYTES", 3 * 64 * 64 * 4)
    select = lambda obj: obj["model_state_dict"]  # noqa: E731
    common.check_finite_torch_file(path, select)
    state["layer0.weight"][5, 5] = float("nan")
    state["layer11.weight"][63, 63] = float("inf")
    torch.save({"model_state_dict": state}, path)
    with pytest.raises(CheckpointFormatError) as err:
        common.check_finite_torch_file(path, select)
    assert "layer0.weight" in str(err.value) and "layer11.weight" in str(err.value)
    assert "layer5.weight" not in str(err.value)


def _spy_loads(monkeypatch, common) -> list[bool]:
    """Record the ``mmap`` argument of every :func:`load_torch_file` call of ``_common``."""
    calls: list[bool] = []
    load = common.load_torch_file

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mmap", False))
        return load(*args, **kwargs)

    monkeypatch.setattr(common, "load_torch_file", spy)
    return calls


@needs_smaps
def test_windowed_finite_check_maps_the_file_once_per_window(tmp_path, monkeypatch):
    """Each window is checked on a mapping of its own, unmapped before the next: the index is
    unpickled once per window (the first mapping also plans the windows), about one window of
    the file is resident at a time and none once the check is done."""
    import scfm.io._common as common

    path = tmp_path / "w.ckpt"
    torch.save({f"w{i}": torch.randn(512, 512) for i in range(8)}, path)  # 1 MiB each
    window = 2 * 512 * 512 * 4
    monkeypatch.setattr(common, "_FINITE_WINDOW_BYTES", window)
    loads = _spy_loads(monkeypatch, common)
    resident: list[int] = []
    all_finite = common._all_finite

    def measured(tensor):
        finite = all_finite(tensor)
        resident.append(resident_bytes(path))
        return finite

    monkeypatch.setattr(common, "_all_finite", measured)
    common.check_finite_torch_file(path, lambda obj: obj)
    assert loads == [True] * 4
    assert len(resident) == 8
    # a window plus the kernel's fault-around (64 KiB) at its edges, never two windows
    assert max(resident) < window + (512 << 10)
    assert resident_bytes(path) == 0


@pytest.mark.parametrize("zip_format", [True, False])
def test_load_finite_torch_file_maps_zip_files_and_reads_legacy_ones_whole(
    tmp_path, monkeypatch, zip_format
):
    """A zip-format file is mapped for the caller and checked on mappings of its own; a
    legacy one is read whole and checked in memory. Either way a NaN is named, and the
    layout ``select`` checks is refused before any value is."""
    import scfm.io._common as common

    state = {"a": torch.randn(4, 4), "b": torch.randn(4), "step": torch.tensor(3)}
    path = tmp_path / "w.ckpt"
    torch.save({"model_state_dict": state}, path, _use_new_zipfile_serialization=zip_format)
    loads = _spy_loads(monkeypatch, common)
    select = lambda obj: obj["model_state_dict"]  # noqa: E731
    obj, got = common.load_finite_torch_file(path, select)
    assert got is obj["model_state_dict"] and set(got) == set(state)
    assert all(torch.equal(got[k], v) for k, v in state.items())
    # the caller's mapping, then one for the check's single window
    assert loads == ([True, True] if zip_format else [False])

    state["b"][1] = float("nan")
    torch.save({"model_state_dict": state}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointFormatError, match=r"NaN or infinite values in b\."):
        common.load_finite_torch_file(path, select)

    def refuse(obj):
        raise CheckpointFormatError("not the expected layout")

    with pytest.raises(CheckpointFormatError, match="not the expected layout"):
        common.load_finite_torch_file(path, refuse)
