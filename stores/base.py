"""What a store whose operations are Lua scripts holds: the Redis client, the key names, the
scripts bound to that client, and the retention its scripts are told (`Retention`)."""

from __future__ import annotations

from redis import Redis

from stores.history import Retention
from stores.keys import Keys
from stores.scripts import Scripts


class ScriptedStore:
    def __init__(
        self,
        client: Redis,
        keys: Keys,
        scripts: Scripts | None = None,
        retention: Retention | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        # Pass the one `Scripts` of the client (`Services` does) to register them once.
        self.scripts = scripts or Scripts(client)
        self.retention = retention or Retention()
