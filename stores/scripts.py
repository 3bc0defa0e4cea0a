"""The Lua scripts in `stores/lua/`, loaded by name and bound to a Redis client.

Each `NAME.lua` is one atomic operation; its opening comment maps the keys it touches, its
arguments, the guarantee it gives and what it returns. `_prelude.lua` (constants and the
Redis-clock helpers) is prepended to each at load, as BullMQ's includes are, so no script
carries its own copy. redis-py's `Script` sends EVALSHA and falls back to EVAL when a
restarted Redis has forgotten the script.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Any

from redis import Redis
from redis.cluster import ClusterPipeline, RedisCluster
from redis.commands.core import Script
from redis.typing import EncodableT, KeyT

PRELUDE = "_prelude"


def _folder() -> Traversable:
    return files("stores").joinpath("lua")


@cache
def script_names() -> tuple[str, ...]:
    """Every operation in the folder (the prelude is not one)."""
    return tuple(
        sorted(
            entry.name.removesuffix(".lua")
            for entry in _folder().iterdir()
            if entry.name.endswith(".lua") and not entry.name.startswith("_")
        )
    )


@cache
def script_source(name: str) -> str:
    """The source Redis runs for `name`: the prelude, then the script."""
    if name not in script_names():
        raise KeyError(f"no Lua script named {name!r} in stores/lua/")
    prelude = _folder().joinpath(f"{PRELUDE}.lua").read_text(encoding="utf-8")
    body = _folder().joinpath(f"{name}.lua").read_text(encoding="utf-8")
    return f"{prelude}\n{body}"


def encoded(values: Iterable[str | int]) -> list[bytes]:
    """`values` as redis-py would send them (a text as UTF-8, a number as its decimal
    text), for the keys and arguments of a script call that are the same for every call of
    a process: built once, they pass redis-py's encoder as they are. It encodes each
    argument of each call in Python (~0.35 us a text or number, bytes left alone), and a
    post's calls carry ~70 constant ones (issue 26)."""
    return [value.encode() if isinstance(value, str) else str(value).encode() for value in values]


class ClusterScript(Script):
    """A script on a Redis Cluster. Called on the client, it is redis-py's: EVALSHA sent
    to the master of its first key's slot (every key of a call shares one hash tag, so one
    slot; RedisCluster refuses a call whose keys do not), and on NOSCRIPT (a node that
    never saw it, a replica promoted by a failover: the script cache is not replicated)
    SCRIPT LOAD on every master, then EVALSHA again. Queued on a cluster pipeline, where
    redis-py leaves NOSCRIPT to the caller, it is sent as EVAL with its source: no node,
    old or newly promoted, can answer NOSCRIPT in the middle of a pipeline (the same
    choice as `PipelinedEnqueue`, for a few KB more per call)."""

    def __call__(
        self,
        keys: Sequence[KeyT] | None = None,
        args: Iterable[EncodableT] | None = None,
        client: Any = None,
    ) -> Any:
        if isinstance(client, ClusterPipeline):
            keys = list(keys or [])
            # ClusterPipeline.eval() is its transaction's, not the EVAL command.
            return client.execute_command("EVAL", self.script, len(keys), *keys, *(args or []))
        return super().__call__(keys, args, client)


class Scripts:
    """The scripts registered on one client, as attributes named after their files
    (`scripts.take_batch`); pass `client=pipeline` to queue a call."""

    def __init__(self, client: Redis) -> None:
        kind = ClusterScript if isinstance(client, RedisCluster) else Script
        self._scripts: dict[str, Script] = {
            name: kind(client, script_source(name)) for name in script_names()
        }

    def __getattr__(self, name: str) -> Script:
        try:
            return self.__dict__["_scripts"][name]
        except KeyError:
            raise AttributeError(f"no Lua script named {name!r}") from None
