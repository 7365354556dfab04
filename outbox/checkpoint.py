"""The per-stream checkpoint hash in Redis, written in the same MULTI as the XADDs.

Fields: `seq` (last outbox sequence in the stream), `outbox` (identity of the
outbox that wrote it), `at` (when), and `pos:<source>` for each source's
position of its last published record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_HASH_TAG = re.compile(r"\{([^}]+)\}")
POS_PREFIX = "pos:"


def checkpoint_key(stream: str) -> str:
    """Same hash slot as the stream itself, so Redis Cluster accepts the transaction.

    A stream key without a hash tag hashes whole, so `{stream}` lands in its slot;
    one that has a tag already hashes on that tag, so we reuse it.
    """
    tag = _HASH_TAG.search(stream)
    if tag:
        return f"straw:ckpt:{{{tag.group(1)}}}:{stream}"
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
