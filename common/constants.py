"""Names shared by every role: Redis keys, schema versions, metric namespaces and keys.

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

#: metric namespaces (CleanRL style)
NS_LOSS = "loss"
NS_REWARD = "reward"
NS_DIVERSITY = "diversity"
NS_PLASTICITY = "plasticity"
NS_BUFFER = "buffer"
NS_WEIGHTS = "weights"
NS_THROUGHPUT = "throughput"
NS_PPO = "ppo"  # objective=ppo: kl, kl_coef, clipfrac, value_loss, ...
NS_TIME = "time"  # time/{role}/{phase}: each phase's share of its role's time (common/timing.py)


def metric(namespace: str, name: str) -> str:
    """`namespace/name`: the key of a learner metric in metrics.jsonl (CleanRL's `charts/…`, `losses/…`)."""
    return f"{namespace}/{name}"


#: metric keys read outside the learner (learner/learner.py writes them under the NS_ namespaces; the driver's
#: progress line and the run report read them)
LOSS_TOTAL = metric(NS_LOSS, "total")
LOSS_ENTROPY = metric(NS_LOSS, "entropy")
REWARD = metric(NS_REWARD, "reward")
LOG_REWARD = metric(NS_REWARD, "log_reward")
TEXT_DIVERSITY = metric(NS_DIVERSITY, "text")
FLOW_DORMANT = metric(NS_PLASTICITY, "flow_dormant")
POLICY_DORMANT = metric(NS_PLASTICITY, "policy_dormant")
LAG_MEAN = metric(NS_WEIGHTS, "lag_mean")
LAG_MAX = metric(NS_WEIGHTS, "lag_max")
BUFFER_SIZE = metric(NS_BUFFER, "size")
FRESH_FRACTION = metric(NS_BUFFER, "fresh_fraction")
FRESH_FRACTION_RUN = metric(NS_BUFFER, "fresh_fraction_run")
FRESH_PER_S = metric(NS_THROUGHPUT, "fresh_per_s")
