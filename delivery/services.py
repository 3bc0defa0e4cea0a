"""The long-lived objects one process needs, built once per process (and again after a fork).

Redis clients keep a connection pool; the Braze client keeps keep-alive connections. Both
are created lazily, so a producer that never posts never needs an API key. The Redis half
(client, keys, scripts, buffer) and the per-process registry are `stores.services`, which
the producer uses alone; `Services` adds the worker's parts.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

from config.settings import Settings
from delivery.braze_client import BrazeClient
from delivery.braze_reads import BrazeReader, read_limiter
from delivery.coalescer import Coalescer
from delivery.liveness import Liveness
from delivery.opt_outs import OptOutCheck
from delivery.poster import Poster
from delivery.thread_share import process_share
from stores import counters
from stores.batch_records import BatchStore
from stores.clock import server_time_ms
from stores.counters import Counters
from stores.dead_letters import DeadLetters
from stores.heartbeats import Heartbeats
from stores.limiter import Budget, RateLimiter
from stores.opt_out_reads import OptOutReads
from stores.refusals import Refusals
from stores.services import StoreServices, forget_services, process_services, workspace_names

__all__ = ["Services", "reset_services", "services", "workspace_names"]


class Services(StoreServices):
    @cached_property
    def batches(self) -> BatchStore:
        return BatchStore(self.redis, self.keys, self.scripts, self.retention)

    @cached_property
    def dead_letters(self) -> DeadLetters:
        return DeadLetters(self.redis, self.keys, self.scripts, self.retention)

    @cached_property
    def heartbeats(self) -> Heartbeats:
        return Heartbeats(self.redis, self.keys, self.scripts)

    @cached_property
    def liveness(self) -> Liveness:
        """This process's heartbeat (started by the worker's start or its first post)."""
        settings = self.settings
        return Liveness(
            self.heartbeats,
            interval_seconds=settings.heartbeat_interval_seconds,
            ttl_seconds=settings.heartbeat_ttl_seconds,
            lease_seconds=settings.batch_claim_seconds,
            recover_ended=lambda pairs: self.batches.recover_orphans(
                (), settings.redispatch_grace_ms, ended_by=pairs
            ),
        )

    def coalescer(
        self,
        dispatch: Callable[[str], object],
        dispatch_many: Callable[[list[str]], object] | None = None,
    ) -> Coalescer:
        """A coalescer over this process's stores; `dispatch` sends one post message,
        `dispatch_many` one message of several batches."""
        return Coalescer(
            self.settings,
            self.buffer,
            self.batches,
            self.limiter,
            self.heartbeats,
            dispatch,
            dispatch_many,
        )

    def poster(self, braze: BrazeClient | None = None, settings: Settings | None = None) -> Poster:
        """A poster with this process's stores, budget, heartbeat and opt-out check
        (`braze`: another client, e.g. one with a fault-injecting transport; `settings`:
        other settings for the posting itself)."""
        return Poster(
            settings or self.settings,
            self.batches,
            braze or self.braze,
            self.limiter,
            self.liveness,
            Counters(self.redis, self.keys, self.scripts),
            Refusals(self.redis, self.keys),
            opt_outs=self.opt_outs,
            share=process_share(self.settings.worker_concurrency, len(workspace_names())),
        )

    @cached_property
    def limiter(self) -> RateLimiter:
        return self.limiter_for(self.settings.workspace_id)

    def limiter_for(self, workspace_id: str) -> RateLimiter:
        """The shared budget of a workspace (this process's, or one a worker recorded)."""
        settings = self.settings
        budget = Budget.for_limit(
            settings.braze_rate_limit,
            settings.braze_rate_limit_window_seconds,
            headroom=settings.rate_limit_headroom,
            burst_fraction=settings.rate_limit_burst_fraction,
        )
        return RateLimiter(
            self.redis,
            self.keys.limiter(workspace_id),
            budget,
            max_wait_seconds=settings.token_wait_max_seconds,
            probe_interval_seconds=settings.credentials_probe_seconds,
            scripts=self.scripts,
            credentials_key=self.keys.credentials,
            workspace=workspace_id,
            bulk_max_wait_seconds=settings.bulk_token_wait_max_seconds,
            bulk_floor_share=settings.bulk_floor_share,
        )

    @cached_property
    def read_limiter(self) -> RateLimiter:
        """The workspace's budget for the read endpoints (BRAZE_READ_RATE_LIMIT)."""
        settings = self.settings
        return read_limiter(
            settings,
            self.redis,
            self.keys.read_limiter(settings.workspace_id),
            max_wait_seconds=settings.token_wait_max_seconds,
            scripts=self.scripts,
        )

    def reader(self, *, max_wait_seconds: float | None) -> BrazeReader:
        """Reads through the read budget; a worker waits at most `TOKEN_WAIT_MAX_SECONDS`
        for a turn, the CLI (None) as long as it takes."""
        return BrazeReader(
            self.braze,
            self.read_limiter,
            max_wait_seconds=max_wait_seconds,
            record=lambda path, status: counters.record_request(
                self.redis, self.keys, path, status
            ),
        )

    @cached_property
    def opt_outs(self) -> OptOutCheck:
        """The check a worker makes before posting changes with respect_opt_out."""
        return OptOutCheck(
            self.settings,
            self.reader(max_wait_seconds=self.settings.token_wait_max_seconds),
            OptOutReads(self.redis, self.keys),
        )

    def record_workspace(self) -> None:
        """A posting process says which workspace's budget it spends, and since when."""
        now_ms = server_time_ms(self.redis)
        self.redis.hset(self.keys.workspaces, self.settings.workspace_id, now_ms)

    def close(self) -> None:
        if "braze" in self.__dict__:
            self.braze.close()
        if "liveness" in self.__dict__:
            self.liveness.stop()

    @cached_property
    def braze(self) -> BrazeClient:
        settings = self.settings
        settings.require_braze()
        assert settings.braze_api_key is not None and settings.rest_endpoint is not None
        return BrazeClient(
            settings.rest_endpoint,
            settings.braze_api_key,
            timeout_seconds=settings.http_timeout_seconds,
            max_connections=settings.worker_concurrency,
        )


def services(workspace: str | None = None) -> Services:
    """This process's services for one workspace (threads share them; a forked child builds
    its own). None: the only workspace, or `default`; with several and none named
    `default`, a LookupError naming the choices (`workspace_names()` lists them)."""
    return process_services(Services, workspace)


def reset_services() -> None:
    """Forget this process's services (tests that change settings call this)."""
    forget_services()
