"""The Lua scripts in `stores/lua/`, loaded by name and bound to a Redis client.

Each `NAME.lua` is one atomic operation; its opening comment maps the keys it touches, its
arguments, the guarantee it gives and what it returns. `_prelude.lua` (constants and the
Redis-clock helpers) is prepended to each at load, as BullMQ's includes are, so no script
carries its own copy. redis-py's `Script` sends EVALSHA and falls back to EVAL when a
restarted Redis has forgotten the script.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from importlib.resources.abc import Traversable

from redis import Redis
from redis.commands.core import Script

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


class Scripts:
    """The scripts registered on one client, as attributes named after their files
    (`scripts.take_batch`); pass `client=pipeline` to queue a call."""

    def __init__(self, client: Redis) -> None:
        self._scripts: dict[str, Script] = {
            name: client.register_script(script_source(name)) for name in script_names()
        }

    def __getattr__(self, name: str) -> Script:
        try:
            return self.__dict__["_scripts"][name]
        except KeyError:
            raise AttributeError(f"no Lua script named {name!r}") from None
