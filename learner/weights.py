"""Versioned weight broadcast from the learner to the samplers.

The learner publishes a state dict with a monotonically increasing version; samplers ask for
anything newer than what they hold, between batches. Weights cross processes as safetensors
bytes (no pickle) through the Ray object store: the learner `ray.put`s them once and the
`WeightStore` actor hands out the ObjectRef, so the bytes never pass through the driver or the
store actor itself.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def pack_state_dict(state: dict[str, torch.Tensor]) -> bytes:
    # safetensors refuses shared storage (GPT-2 ties lm_head to wte): copy each tensor to CPU
    return st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()})


def unpack_state_dict(blob: bytes) -> dict[str, torch.Tensor]:
    return st_load(blob)


class WeightStore:
    """Holds the newest (version, ref). Plain class; `ray.remote(WeightStore)` is the actor.

    In-process use (tests) stores the packed bytes themselves; through Ray it stores
    `[ObjectRef]` (a list, so Ray passes the reference without resolving it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = -1
        self._payload: object = None

    def publish(self, version: int, payload: object) -> int:
        with self._lock:
            if version <= self._version:
                raise ValueError(f"weight version {version} is not newer than the published {self._version}")
            self._version, self._payload = version, payload
            return version

    def version(self) -> int:
        return self._version

    def latest(self, have_version: int = -1) -> Optional[tuple[int, object]]:
        """(version, payload) when newer than `have_version`, else None."""
        with self._lock:
            if self._version > have_version:
                return self._version, self._payload
            return None


class WeightsClient:
    """One interface over a local WeightStore or a Ray actor handle of one."""

    def __init__(self, store) -> None:
        self.store = store
        self.is_ray = hasattr(getattr(store, "publish", None), "remote")

    def publish(self, version: int, state: dict[str, torch.Tensor]) -> None:
        blob = pack_state_dict(state)
        if self.is_ray:
            import ray

            ray.get(self.store.publish.remote(version, [ray.put(blob)]))
        else:
            self.store.publish(version, blob)

    def fetch(self, have_version: int) -> Optional[tuple[int, dict[str, torch.Tensor]]]:
        if self.is_ray:
            import ray

            answer = ray.get(self.store.latest.remote(have_version))
            if answer is None:
                return None
            version, (ref,) = answer
            return version, unpack_state_dict(ray.get(ref))
        answer = self.store.latest(have_version)
        if answer is None:
            return None
        version, blob = answer
        return version, unpack_state_dict(blob)
