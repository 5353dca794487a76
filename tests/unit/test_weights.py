"""The weight broadcast's payload: safetensors bytes read in place, without a copy."""
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load

from common.weights import DTYPES, WeightStore, WeightsClient, pack_into, pack_state_dict, view_state_dict


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {f"t_{name.lower()}": (torch.randn(3, 5, generator=g) * 7).to(dtype) for name, dtype in DTYPES.items()}
    state["scalar"] = torch.tensor(2.5)
    state["empty"] = torch.zeros(0, 4)
    return state


def test_views_equal_safetensors_own_reader_for_every_dtype():
    blob = pack_state_dict(_state())
    viewed, loaded = view_state_dict(blob), st_load(blob)
    assert viewed.keys() == loaded.keys()
    for name, tensor in loaded.items():
        assert viewed[name].dtype == tensor.dtype and viewed[name].shape == tensor.shape, name
        assert torch.equal(viewed[name], tensor), name


def test_views_read_the_payload_in_place():
    """What the object store hands a receiver (a read-only uint8 array): no tensor is a copy of it."""
    array = np.frombuffer(pack_state_dict(_state()), dtype=np.uint8)
    start = array.ctypes.data
    for name, tensor in view_state_dict(array).items():
        if tensor.numel():
            assert start <= tensor.data_ptr() < start + array.nbytes, f"{name} was copied"


def test_a_module_loads_the_views():
    sender, receiver = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    receiver.load_state_dict(view_state_dict(np.frombuffer(pack_state_dict(sender.state_dict()), dtype=np.uint8)))
    assert torch.equal(receiver.weight, sender.weight) and torch.equal(receiver.bias, sender.bias)


def test_in_process_store_round_trip():
    store, state = WeightStore(), {"w": torch.arange(6.0).view(2, 3)}
    client = WeightsClient(store)
    assert client.fetch(-1) is None
    version = client.publish(7, state)
    got_version, step, got = client.fetch(-1)
    assert (got_version, step) == (version, 7) and torch.equal(got["w"], state["w"])
    assert client.fetch(version) is None


def _blob(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize("blob, words", [
    (b"\x01", "8-byte header"),
    (_blob(b"{oo}"), "not JSON"),
    (_blob(b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', b"\0" * 8), "bytes 0..16 of 8"),
    (_blob(b'{"w":{"dtype":"Q99","shape":[0],"data_offsets":[0,0]}}'), "'Q99'"),
])
def test_a_payload_that_is_not_safetensors_is_named(blob, words):
    with pytest.raises(ValueError, match="weights payload") as info:
        view_state_dict(blob)
    assert words in str(info.value)


def test_packing_reuses_the_buffer_it_is_given():
    first, second = {"w": torch.ones(4, 4)}, {"w": torch.full((4, 4), 3.0), "b": torch.arange(3)}
    buffer = pack_into(first)
    again = pack_into(second, np.empty(buffer.nbytes + 64, dtype=np.uint8))
    reused = pack_into(second, again)
    assert reused.ctypes.data == again.ctypes.data, "no new allocation when the buffer is large enough"
    loaded = st_load(reused.tobytes())
    assert torch.equal(loaded["w"], second["w"]) and torch.equal(loaded["b"], second["b"])
