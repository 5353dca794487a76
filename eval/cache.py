"""The eval's results cache: SQLite, one row per rendered text, msgpack records (no pickle).

    results(model, seed, against, key) → record
        model    render/score identity: SD name + hash of model, render settings, precision, scorers
                 (`worker.render_id`); two evals share a row exactly when they would compute the same thing
        seed     eval.images.seed (image i starts from randn(seed + i))
        against  the plain prompt the CLIP relevance is measured against (the text itself for a plain prompt)
        key      the rendered text, or `embeds:<sha>` for conditioning (IPGO)
    rewrites(method, prompt) → the method's rewrites of that prompt, as JSON text (method: hash of
        `Method.identity()` and the rewrite count), so a resumed eval does not decode again

The plain prompt is a row with against = key = prompt: rendered once for every method. Rows are
committed as results arrive, so an interrupted eval resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import msgpack
import numpy as np

#: msgpack schema of a results record; bump when the fields change meaning
RECORD_SCHEMA = 1

_TABLES = """
CREATE TABLE IF NOT EXISTS results (model TEXT, seed INTEGER, against TEXT, key TEXT, record BLOB,
                                    created_at TEXT, PRIMARY KEY (model, seed, against, key));
CREATE TABLE IF NOT EXISTS rewrites (method TEXT, prompt TEXT, texts TEXT, created_at TEXT,
                                     PRIMARY KEY (method, prompt));
"""


def encode_record(rec: dict[str, Any]) -> bytes:
    """{aes: [k], clip: [k], extra: {name: [k]}, emb: (k, D) float array, inc: (k, 2048) float array (only with
    eval.inception), thumb: PNG bytes | None} → msgpack."""
    emb = np.asarray(rec["emb"], dtype=np.float16)
    out = {"v": RECORD_SCHEMA, "aes": [float(x) for x in rec["aes"]], "clip": [float(x) for x in rec["clip"]],
           "extra": {k: [float(x) for x in v] for k, v in (rec.get("extra") or {}).items()},
           "emb": emb.tobytes(), "emb_shape": list(emb.shape), "thumb": rec.get("thumb")}
    if rec.get("inc") is not None:
        inc = np.asarray(rec["inc"], dtype=np.float16)
        out.update({"inc": inc.tobytes(), "inc_shape": list(inc.shape)})
    return msgpack.packb(out, use_bin_type=True)


def decode_record(blob: bytes) -> Optional[dict[str, Any]]:
    """The record, or None when it is of another schema or unreadable (then it is simply recomputed)."""
    try:
        raw = msgpack.unpackb(blob, raw=False)
        if raw.get("v") != RECORD_SCHEMA:
            return None
        emb = np.frombuffer(raw["emb"], dtype=np.float16).reshape(raw["emb_shape"])  # float16: a full sd14 eval holds ~60k
        rec = {"aes": raw["aes"], "clip": raw["clip"], "extra": raw["extra"], "emb": emb, "thumb": raw["thumb"]}
        if "inc" in raw:
            rec["inc"] = np.frombuffer(raw["inc"], dtype=np.float16).reshape(raw["inc_shape"])
        return rec
    except (ValueError, KeyError, TypeError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException):
        return None


def method_key(identity: dict, n: int) -> str:
    return hashlib.sha256(json.dumps({"id": identity, "n": n}, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResultsCache:
    """get_many / put_many over the `results` table, and the decoded-rewrites table (see module doc)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_TABLES)
        self.hits = 0
        self.misses = 0

    def get_many(self, model: str, seed: int, items: Iterable[tuple[str, str]],
                 need_thumb: Sequence[bool] | None = None) -> dict[tuple[str, str], dict[str, Any]]:
        """(against, key) → record for the items present (with a thumbnail where `need_thumb` asks)."""
        items = list(items)
        need = list(need_thumb) if need_thumb is not None else [False] * len(items)
        found = {}
        for (against, key), thumb in zip(items, need):
            row = self.db.execute("SELECT record FROM results WHERE model=? AND seed=? AND against=? AND key=?",
                                  (model, seed, against, key)).fetchone()
            rec = decode_record(row[0]) if row else None
            if rec is not None and (not thumb or rec["thumb"]):
                found[(against, key)] = rec
        self.hits += len(found)
        self.misses += len(items) - len(found)
        return found

    def put_many(self, model: str, seed: int, rows: Iterable[tuple[str, str, bytes]]) -> None:
        """(against, key, encoded record) rows, committed at once."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?)",
                            [(model, seed, a, k, blob, now) for a, k, blob in rows])
        self.db.commit()

    def get_rewrites(self, method: str, prompt: str) -> Optional[list[str]]:
        row = self.db.execute("SELECT texts FROM rewrites WHERE method=? AND prompt=?", (method, prompt)).fetchone()
        return json.loads(row[0]) if row else None

    def put_rewrites(self, method: str, rows: Iterable[tuple[str, list[str]]]) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.db.executemany("INSERT OR REPLACE INTO rewrites VALUES (?, ?, ?, ?)",
                            [(method, p, json.dumps(texts), now) for p, texts in rows])
        self.db.commit()

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def close(self) -> None:
        self.db.close()
