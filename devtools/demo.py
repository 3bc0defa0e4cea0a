"""`braze-subs demo`: the whole pipeline on one machine, no Braze account needed.

Starts a private redis-server and the Braze simulator, a Celery worker and beat (the same
commands as the Procfile), feeds sample changes in waves that flip the same identifiers,
waits until everything is delivered, prints what "Braze" received, checks it against the
last-written state of every identifier, and shuts everything down.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from redis import Redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from core.errors import BrazeSubsError
from devtools.processes import celery_process, free_port, local_redis, port_is_free
from simulator import SimulatorConfig, SimulatorServer
from simulator.order_check import applied_from_document, requests_by_key

DEMO_KEY = "demo-key"
EMAIL_GROUPS = ("newsletter", "product-updates")
SMS_GROUPS = ("sms-promos",)
FLOWER_PORT = 5555


class DemoError(BrazeSubsError):
    """The demo could not run or its results were wrong; the message says which."""


def sample_changes(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """Changes in the shape of import rows, over emails, phones and external ids, with many
    flips of the same identifiers (a quarter of the population changes several times)."""
    population = max(10, count // 3)
    rows = []
    for _ in range(count):
        n = rng.randrange(population)
        kind = ("email", "phone", "external_id")[n % 3]
        state = rng.choice(("subscribed", "unsubscribed"))
        if kind == "email":
            group, value = rng.choice(EMAIL_GROUPS), f"user{n}@example.com"
        elif kind == "phone":
            group, value = SMS_GROUPS[0], f"+1415{2_000_000 + n % 8_000_000:07d}"
        else:
            group, value = rng.choice(EMAIL_GROUPS + SMS_GROUPS), f"user-{n}"
        rows.append({"subscription_group_id": group, "subscription_state": state, kind: value})
    return rows


def run_demo(*, changes: int, console: Console, out: Console, keep_running: bool = False) -> None:
    from config.settings import get_settings
    from stores.buffer import Buffer
    from stores.keys import Keys, buffer_field
    from tasks.producer import validate_changes

    rng = random.Random(2026)
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="braze-subs-")))
        console.print("1/5 starting a local redis-server")
        try:
            redis_url = stack.enter_context(local_redis(workdir))
        except (FileNotFoundError, TimeoutError) as exc:
            raise DemoError(f"{exc} (./dev demo installs redis-server)") from None
        console.print("2/5 starting the Braze simulator")
        sim = SimulatorServer(
            SimulatorConfig(
                api_keys={DEMO_KEY},
                email_groups=set(EMAIL_GROUPS),
                sms_groups=set(SMS_GROUPS),
                # Kept running, it accepts any group id, so that imports of your own files
                # land (as an email or SMS group by their identifiers).
                auto_groups=keep_running,
            )
        )
        sim.start()
        stack.callback(sim.stop)
        # Every process of the demo uses the prefix this one was configured with.
        prefix = get_settings().redis_key_prefix
        env = {
            **os.environ,
            "REDIS_KEY_PREFIX": prefix,
            "REDIS_URL": redis_url,
            "BRAZE_REST_ENDPOINT": sim.url,
            "BRAZE_API_KEY": DEMO_KEY,
            "BRAZE_API_VERSION": "v1",
        }
        console.print(f"3/5 starting a worker and beat (logs in {workdir})")
        stack.enter_context(celery_process("worker", env, workdir / "worker.log"))
        stack.enter_context(celery_process("beat", env, workdir / "beat.log"))

        client = Redis.from_url(redis_url)
        keys = Keys(prefix)
        buffer = Buffer(client, keys)
        rows = sample_changes(changes, rng)
        expected: dict[tuple[str, str, str], str] = {}
        console.print(f"4/5 feeding {changes:,} changes in 4 waves that flip identifiers")
        waves = 4
        per_wave = -(-len(rows) // waves)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            task = bar.add_task("enqueued", total=len(rows))
            for start in range(0, len(rows), per_wave):
                validated = validate_changes(rows[start : start + per_wave])
                for chunk_start in range(0, len(validated), 500):
                    chunk = validated[chunk_start : chunk_start + 500]
                    buffer.enqueue(chunk)
                    for change in chunk:
                        expected[(change.group_id, change.kind.value, change.value)] = (
                            change.state.value
                        )
                    bar.advance(task, len(chunk))
                time.sleep(0.5)  # let a coalescer tick or two run between waves

        console.print("5/5 waiting for Braze to have everything")
        started = time.monotonic()
        with console.status("") as spinner:
            while True:
                # The stores' own reads, not `admin.status`: dev tooling imports nothing of
                # the admin layer (and the admin CLI imports it only to run the demo).
                pending, in_flight = buffer.pending_count(), buffer.inflight_count()
                delivered = int(client.hget(keys.stats, "delivered") or 0)
                spinner.update(
                    f"pending {pending:,} · in flight {in_flight:,} · delivered {delivered:,}"
                )
                if pending == 0 and in_flight == 0:
                    break
                if time.monotonic() - started > 300:
                    raise DemoError("the pipeline did not drain within 5 minutes")
                time.sleep(0.2)

        state = httpx.get(f"{sim.url}/_sim/state").json()
        stats = state["stats"]
        received = {
            (item["group"], item["kind"], item["value"]): item["state"]
            for item in state["subscriptions"]
        }
        mismatches = sum(1 for slot, value in expected.items() if received.get(slot) != value)
        requests = [r for r in stats["requests"] if r["status"] == 201]
        identifiers = sum(r["identifiers"] for r in requests)
        table = Table(title="What Braze received", show_header=False, title_justify="left")
        table.add_row("changes enqueued", f"{changes:,}")
        table.add_row("distinct group + identifier pairs", f"{len(expected):,}")
        table.add_row("requests accepted (201)", f"{len(requests):,}")
        table.add_row("identifiers posted", f"{identifiers:,}")
        per_request = identifiers / max(1, len(requests))
        table.add_row("identifiers per request", f"{per_request:.1f}")
        table.add_row("fill (of 50 per request)", f"{per_request / 50:.2f}")
        # The workload's floor (issue 26): per group, state and kind, the fewest requests
        # its identifiers need (ceil(n / 50)); a key sent in more is beyond it.
        try:
            applied = applied_from_document(httpx.get(f"{sim.url}/_sim/applied").json())
        except ValueError:  # the simulator's applied log is incomplete: no floor to show
            applied = None
        if applied is not None:
            by_key = requests_by_key(applied, 50)
            floor = sum(need for _sent, need, _n in by_key.values())
            beyond = sum(max(0, sent - need) for sent, need, _n in by_key.values())
            table.add_row(
                "floor: fewest requests (fill)",
                f"{floor:,} ({identifiers / max(1, floor) / 50:.2f})",
            )
            table.add_row("requests beyond the floor", f"{beyond:,}")
        # Batches are cut full; a member a later wave flipped before its batch was posted
        # leaves it at the claim (its older state is never sent), and the claim tops the
        # batch up with due changes of its group, state and kind, when there are any; the
        # newer state goes in a later batch. A short batch is topped up at its take and
        # right before its request too, and takes in members of the batches of its kind no
        # one has claimed, the last cut first (the empty places end in a key's last
        # request). "Cut" counts the members a top-up took from the buffer too.
        counted = client.hmget(keys.stats, ["batched", "topped_up"])
        cut, topped_up = (int(value or 0) for value in counted)
        table.add_row("identifiers cut into batches", f"{cut:,}")
        table.add_row("… taken in by a top-up", f"{topped_up:,}")
        table.add_row(
            "… superseded before their post",
            f"{max(0, cut - identifiers):,}",
        )
        table.add_row("malformed requests", str(stats["malformed"]))
        table.add_row("429 answers", str(stats["rate_limited_429"]))
        table.add_row(
            "identifiers in their last-written state",
            f"{len(expected) - mismatches:,} of {len(expected):,}",
        )
        out.print(table)
        by_group = Counter((group, value) for (group, _k, _v), value in received.items())
        groups = Table("group", "subscribed", "unsubscribed", title="Final state in Braze")
        for group in sorted({group for group, _state in by_group}):
            groups.add_row(
                group,
                f"{by_group[(group, 'subscribed')]:,}",
                f"{by_group[(group, 'unsubscribed')]:,}",
            )
        out.print(groups)
        del buffer_field  # imported for symmetry with tests; not needed here
        if mismatches:
            raise DemoError(f"{mismatches} identifiers are not in their last-written state")
        console.print("done: every identifier is in its last-written state", style="green")
        if keep_running:
            serve_until_interrupted(stack, env, workdir, sim.url, console)


def serve_until_interrupted(
    stack: ExitStack, env: dict[str, str], workdir: Path, sim_url: str, console: Console
) -> None:
    """Add Flower and keep the whole stack up for exploring, until Ctrl-C."""
    port = FLOWER_PORT if port_is_free(FLOWER_PORT) else free_port()
    password = secrets.token_urlsafe(9)
    stack.enter_context(
        celery_process(
            "flower",
            env,
            workdir / "flower.log",
            f"--port={port}",
            "--address=127.0.0.1",
            f"--basic-auth=demo:{password}",
        )
    )
    console.print(
        "\nThe stack keeps running until Ctrl-C:\n"
        f"  Flower     http://127.0.0.1:{port}  (user demo, password {password})\n"
        f"  simulator  {sim_url}/_sim/stats\n"
        f"  logs       {workdir}\n"
        "In another terminal:\n"
        f"  export REDIS_URL={env['REDIS_URL']} REDIS_KEY_PREFIX={env['REDIS_KEY_PREFIX']}\n"
        "  .venv/bin/braze-subs status --watch 2\n"
        "  .venv/bin/braze-subs import YOUR_FILE.csv\n"
        "  .venv/bin/braze-subs enqueue --group newsletter --state unsubscribed "
        "--email jane@example.com",
        highlight=False,
    )

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C, and `kill` too; SIGINT is set explicitly because a shell starts background
    # jobs with it ignored.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping")
