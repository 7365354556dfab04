"""The per-stream checkpoint hash in Redis, written in the same MULTI as the XADDs.

Fields: `seq` (last outbox sequence in the stream), `outbox` (identity of the
outbox that wrote it), `at` (when), and `pos:<source>` for each source's
position of its last published record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

POS_PREFIX = "pos:"


def hash_tag(key: str) -> str | None:
    """What Redis Cluster hashes `key` on, if not the whole key: between the first `{` and the next `}`.

    Redis's own rule, to the letter (a regex search would find a later tag after an
    empty `{}`, which Redis ignores, and so put the checkpoint in another slot).
    """
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    return key[start + 1 : end] if end > start + 1 else None


def checkpoint_key(stream: str) -> str:
    """Same hash slot as the stream itself, so Redis Cluster accepts the transaction.

    A stream key without a hash tag hashes whole, so `{stream}` lands in its slot;
    one that has a tag already hashes on that tag, so we reuse it (and keep the
    whole name after it, so two streams sharing a tag keep two checkpoints).
    A name with braces but no tag (`a{}b`, `a}b`) has no such key; the
    configuration refuses those names.
    """
    tag = hash_tag(stream)
    if tag is not None:
        return f"straw:ckpt:{{{tag}}}:{stream}"
    return f"straw:ckpt:{{{stream}}}"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int = 0
    outbox: str | None = None
    positions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: dict[Any, Any]) -> Checkpoint:
        text = {_s(k): _s(v) for k, v in raw.items()}
        return cls(
            seq=int(text.get("seq", 0)),
            outbox=text.get("outbox"),
            positions={k[len(POS_PREFIX):]: v for k, v in text.items() if k.startswith(POS_PREFIX)},
        )


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
