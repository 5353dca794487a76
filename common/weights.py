"""Versioned weight broadcast from the learner to the samplers.

The learner publishes a state dict with a monotonically increasing version; samplers ask for
anything newer than what they hold, between batches. Weights cross processes as safetensors
bytes (no pickle of the weights) through the Ray object store: the learner `ray.put`s them once, as a
uint8 numpy array so that Ray keeps them out of band, and the `WeightStore` actor hands out the
ObjectRef, so the bytes never pass through the driver or the store actor itself. A receiver on the
same node gets that array as a read-only view of the node's shared memory, reads the tensors in
place (`view_state_dict`) and copies each once, into its parameters: one memory copy per receiver,
the floor (bench/gpu.py part `broadcast` measures it against this machine's memcpy bandwidth).
"""
from __future__ import annotations

import json
import struct
import threading
import warnings
from typing import Optional

import numpy as np
import torch

#: safetensors dtype names → torch dtypes (the format's own table, the ones a policy can hold)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def pack_into(state: dict[str, torch.Tensor], out: Optional[np.ndarray] = None) -> np.ndarray:
    """The safetensors bytes of a state dict as a uint8 array, each storage once, written straight into
    `out` when it is large enough (the learner reuses one buffer: no fresh pages to fault in each publish).

    One copy per tensor, where safetensors' own `save` took 12× a memory copy at GPT-2 124M (0.53 s vs
    0.042 s, bench/gpu.py part `broadcast`). Tensors are laid out by element size, largest first, so
    each is aligned; the header is padded to 8 bytes, as the format allows. A tied tensor (GPT-2's
    `lm_head.weight` is `transformer.wte.weight`) is left out instead of copied (154 MB of 652 MB at
    GPT-2 124M): the receiver loads with `strict=False`, and its own tie restores the missing key.
    """
    kept: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, value in state.items():
        key = (value.untyped_storage().data_ptr(), value.storage_offset())
        if key not in seen:
            seen.add(key)
            kept[name] = value.detach()
    names = {dtype: name for name, dtype in DTYPES.items()}
    order = sorted(kept, key=lambda n: (-kept[n].element_size(), n))
    header, offset = {}, 0
    for name in order:
        t = kept[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    base = 8 + len(text)
    if out is None or out.nbytes < base + offset:
        out = np.empty(base + offset, dtype=np.uint8)
    blob = out[:base + offset]
    blob[:8] = np.frombuffer(struct.pack("<Q", len(text)), dtype=np.uint8)
    blob[8:base] = np.frombuffer(text, dtype=np.uint8)
    flat = torch.from_numpy(blob)
    for name in order:
        start, end = header[name]["data_offsets"]
        if end > start:
            flat[base + start:base + end].view(kept[name].dtype).view(kept[name].shape).copy_(kept[name])
    return blob


def pack_state_dict(state: dict[str, torch.Tensor]) -> bytes:
    """`pack_into` as bytes (in-process stores and tests; the Ray path ships the array)."""
    return pack_into(state).tobytes()


def view_state_dict(blob) -> dict[str, torch.Tensor]:
    """The tensors of safetensors bytes (bytes, or any buffer such as the object store's read-only array),
    viewed in place: no copy. They are read-only — load them into a module (`load_state_dict` copies),
    never write to them. A blob that is not safetensors: ValueError saying what is wrong."""
    raw = memoryview(blob).cast("B")
    if len(raw) < 8:
        raise ValueError(f"weights payload of {len(raw)} bytes: not safetensors (no 8-byte header length)")
    (n,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(bytes(raw[8:8 + n]))
    except ValueError as exc:
        raise ValueError(f"weights payload: its {n}-byte safetensors header is not JSON ({exc})") from None
    base, out = 8 + n, {}
    with warnings.catch_warnings():  # read-only by design: the object store's memory is shared
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = DTYPES.get(info.get("dtype"))
            start, end = info["data_offsets"]
            if dtype is None or base + end > len(raw):
                raise ValueError(f"weights payload: tensor {name!r} has dtype {info.get('dtype')!r} and bytes "
                                 f"{start}..{end} of {len(raw) - base}; expected one of {sorted(DTYPES)} within them")
            count = (end - start) // torch.empty((), dtype=dtype).element_size()
            flat = (torch.frombuffer(raw, dtype=dtype, count=count, offset=base + start) if count
                    else torch.empty(0, dtype=dtype))
            out[name] = flat.view(info["shape"])
    return out


class WeightStore:
    """Holds the newest (version, step, ref). Plain class; `ray.remote(WeightStore)` is the actor.

    `version` counts publications and only grows, so a sampler always sees a change; `step` is the
    learner step the weights come from (trajectories are stamped with it). A learner restarted from
    an older checkpoint publishes a smaller step under a newer version, and samplers follow it.
    In-process use (tests) stores the packed bytes themselves; through Ray it stores `[ObjectRef]`
    (a list, so Ray passes the reference without resolving it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = -1
        self._step = -1
        self._payload: object = None

    def publish(self, step: int, payload: object) -> int:
        with self._lock:
            self._version += 1
            self._step, self._payload = step, payload
            return self._version

    def version(self) -> int:
        return self._version

    def step(self) -> int:
        return self._step

    def latest(self, have_version: int = -1) -> Optional[tuple[int, int, object]]:
        """(version, step, payload) when newer than `have_version`, else None."""
        with self._lock:
            if self._version > have_version:
                return self._version, self._step, self._payload
            return None


class WeightsClient:
    """One interface over a local WeightStore, a Ray actor handle of one, or the name of a Ray one.

    Actors are given the name (`common.cluster.weight_store_name`), not the handle: a handle among
    an actor's constructor arguments is an object-store argument, which Ray cannot promise to an actor
    that restarts (ray-project/ray#53727, logged as an error when the actor is created); a name is a
    plain string, and a restarted actor looks it up again."""

    def __init__(self, store) -> None:
        if isinstance(store, str):
            import ray

            from common.cluster import NAMESPACE

            store = ray.get_actor(store, namespace=NAMESPACE)
        self.store = store
        self.is_ray = hasattr(getattr(store, "publish", None), "remote")
        self._staging: Optional[np.ndarray] = None  # the publisher's packing buffer, reused

    def publish(self, step: int, state: dict[str, torch.Tensor]) -> int:
        if self.is_ray:
            import ray

            blob = self._staging = pack_into(state, self._staging)
            return ray.get(self.store.publish.remote(step, [ray.put(blob)]))  # ray.put copies: reusable after
        return self.store.publish(step, pack_state_dict(state))

    def fetch(self, have_version: int) -> Optional[tuple[int, int, dict[str, torch.Tensor]]]:
        """(version, step, state dict) when the store holds a newer version than `have_version`; the tensors are
        read-only views of the payload (`view_state_dict`): load them into a module."""
        if self.is_ray:
            import ray

            answer = ray.get(self.store.latest.remote(have_version))
            if answer is None:
                return None
            version, step, (ref,) = answer
            return version, step, view_state_dict(ray.get(ref))
        answer = self.store.latest(have_version)
        if answer is None:
            return None
        version, step, blob = answer
        return version, step, view_state_dict(blob)
