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
    """safetensors bytes of a state dict, each storage once.

    A tied tensor (GPT-2's `lm_head.weight` is `transformer.wte.weight`) is left out instead of copied:
    safetensors refuses shared storage, and shipping the copy cost 154 MB of 652 MB at GPT-2 124M. The
    receiver loads with `strict=False`, and its own tie restores the missing key.
    """
    kept: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, value in state.items():
        key = (value.untyped_storage().data_ptr(), value.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        kept[name] = value.detach().to("cpu").contiguous()
    return st_save(kept)


def unpack_state_dict(blob: bytes) -> dict[str, torch.Tensor]:
    return st_load(blob)


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

    def publish(self, step: int, state: dict[str, torch.Tensor]) -> int:
        blob = pack_state_dict(state)
        if self.is_ray:
            import ray

            return ray.get(self.store.publish.remote(step, [ray.put(blob)]))
        return self.store.publish(step, blob)

    def fetch(self, have_version: int) -> Optional[tuple[int, int, dict[str, torch.Tensor]]]:
        """(version, step, state dict) when the store holds a newer version than `have_version`."""
        if self.is_ray:
            import ray

            answer = ray.get(self.store.latest.remote(have_version))
            if answer is None:
                return None
            version, step, (ref,) = answer
            return version, step, unpack_state_dict(ray.get(ref))
        answer = self.store.latest(have_version)
        if answer is None:
            return None
        version, step, blob = answer
        return version, step, unpack_state_dict(blob)
