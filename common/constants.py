"""Names shared by every role: Redis keys, schema versions, metric namespaces.

Keys are the user-facing contract of docs/design.md: a person reads them with redis-cli,
so they change only with a schema bump.
"""
from __future__ import annotations

#: msgpack schema of `Trajectory.blob`; bump when the blob's fields change meaning.
TRAJECTORY_SCHEMA = 1
#: schema of the whole Redis layout of a run, stored in `pag:{run}:meta`.
LAYOUT_SCHEMA = 1

KEY_PREFIX = "pag"


def run_key(run: str, *parts: str) -> str:
    """`pag:{run}:part1:part2…` — every key of a run starts with this prefix."""
    if not run or ":" in run or any(c.isspace() for c in run):
        raise ValueError(f"run name {run!r} must be non-empty with no ':' or whitespace")
    return ":".join((KEY_PREFIX, run, *parts))


def traj_key(run: str, traj_id: str) -> str:
    return run_key(run, "traj", traj_id)


def prio_key(run: str) -> str:
    return run_key(run, "prio")


def pending_key(run: str) -> str:
    return run_key(run, "pending")


def fresh_key(run: str) -> str:
    return run_key(run, "fresh")


def meta_key(run: str) -> str:
    return run_key(run, "meta")


def failed_key(run: str) -> str:
    return run_key(run, "failed")


def dedup_key(run: str) -> str:
    """HASH sha1(prompt NUL response) → id: one stored copy of an identical rewrite."""
    return run_key(run, "dedup")


def order_key(run: str) -> str:
    """ZSET id → insertion sequence, kept only for FIFO eviction."""
    return run_key(run, "order")


def plain_key(model: str, seed: int, sha: str) -> str:
    """Cached score of a plain prompt, shared across runs that render with the same model and seed."""
    return ":".join((KEY_PREFIX, "plain", model, str(seed), sha))


#: consumer groups on the two work streams
SCORERS_GROUP = "scorers"
LEARNER_GROUP = "learner"

#: the policy's input template (docs/design.md)
REPHRASE_TEMPLATE = "{prompt} Rephrase:\n"

#: metric namespaces (CleanRL style)
NS_LOSS = "loss"
NS_REWARD = "reward"
NS_DIVERSITY = "diversity"
NS_PLASTICITY = "plasticity"
NS_BUFFER = "buffer"
NS_WEIGHTS = "weights"
NS_THROUGHPUT = "throughput"
NS_PPO = "ppo"  # objective=ppo: kl, kl_coef, clipfrac, value_loss, ...
