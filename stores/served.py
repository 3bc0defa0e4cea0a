"""Work no worker would ever take: what waits in the key space of a workspace that
BRAZE_WORKSPACES_FILE does not serve (issue 23).

Each workspace is a pipeline in a key space of its own (`stores/keys.py`), and a worker
serves exactly the workspaces of the file. A workspace renamed or taken out of the file,
or a deployment moved to the file without naming its workspace `default`, leaves its
pending changes, batches and dead letters where no tick, post or `dlq` command looks:
an unsubscribe would wait there forever, unseen. So a worker's start looks at every key
space a worker has served before (`Keys.served_workspaces`) and at the default one, and
refuses to start while any the file does not serve holds work (`tasks/celery_app.py`).

Cheap by construction: three O(1) reads per such key space (HLEN, ZCARD, HLEN), no SCAN;
a key space found empty is forgotten, so the set holds only the served and the stranded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from redis import Redis

from core.routing import DEFAULT_WORKSPACE
from stores.keys import Keys


@dataclass(frozen=True, slots=True)
class Stranded:
    """Work waiting in the key space of a workspace no longer served."""

    workspace: str
    pending: int
    batches: int
    dead_letters: int

    def describe(self) -> str:
        held = [
            f"{count} {what}"
            for count, what in (
                (self.pending, "pending changes"),
                (self.batches, "batches"),
                (self.dead_letters, "dead letters"),
            )
            if count
        ]
        return f"workspace {self.workspace!r} ({', '.join(held)})"


def record_served(client: Redis, prefix: str, names: Iterable[str]) -> None:
    """Remember that workers serve `names` (a worker's start, after `stranded_work`)."""
    listed = list(names)
    if listed:
        client.sadd(Keys(prefix).served_workspaces, *listed)


def stranded_work(client: Redis, prefix: str, served: Iterable[str]) -> list[Stranded]:
    """The key spaces not in `served` that hold work: those a worker served before, and the
    default one (a deployment of before the file). Empty ones are forgotten."""
    serving = set(served)
    known = {name.decode() for name in client.smembers(Keys(prefix).served_workspaces)}
    candidates = sorted((known | {DEFAULT_WORKSPACE}) - serving)
    found: list[Stranded] = []
    for name in candidates:
        keys = Keys(prefix, name)
        # One key space per pipeline: its keys share a slot (a Redis Cluster too).
        with client.pipeline(transaction=False) as pipe:
            pipe.hlen(keys.pending)
            pipe.zcard(keys.batches)
            pipe.hlen(keys.dead_letters)
            pending, batches, dead_letters = pipe.execute()
        if pending or batches or dead_letters:
            found.append(Stranded(name, int(pending), int(batches), int(dead_letters)))
        elif name in known:
            client.srem(Keys(prefix).served_workspaces, name)
    return found
