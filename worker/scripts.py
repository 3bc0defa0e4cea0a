"""The Lua scripts in `worker/lua/`, loaded once and bound to a Redis client.

Each script is one atomic operation; its opening comment maps the keys it touches and the
guarantee it gives. redis-py's `Script` sends EVALSHA and falls back to EVAL when a
restarted Redis has forgotten the script.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from redis import Redis
from redis.commands.core import Script


@cache
def script_source(name: str) -> str:
    return files("worker").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


class Scripts:
    """The scripts registered on one client; pass `client=pipeline` to queue a call."""

    def __init__(self, client: Redis) -> None:
        self.enqueue: Script = client.register_script(script_source("enqueue"))
        self.take_batch: Script = client.register_script(script_source("take_batch"))
        self.claim_batch: Script = client.register_script(script_source("claim_batch"))
        self.finish_batch: Script = client.register_script(script_source("finish_batch"))
        self.defer_batch: Script = client.register_script(script_source("defer_batch"))
        self.split_batch: Script = client.register_script(script_source("split_batch"))
        self.replay_dead_letter: Script = client.register_script(
            script_source("replay_dead_letter")
        )
        self.circuit: Script = client.register_script(script_source("circuit"))
        self.acquire_token: Script = client.register_script(script_source("acquire_token"))
        self.observe_rate_limit: Script = client.register_script(
            script_source("observe_rate_limit")
        )
        self.purge_dead_letter: Script = client.register_script(script_source("purge_dead_letter"))
