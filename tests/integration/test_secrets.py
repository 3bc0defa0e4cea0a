"""Issue 10, secrets: a key with surrounding whitespace, a key that cannot go in a header,
and transport errors that quote the key or URL userinfo - against the simulator over HTTP
and a real Redis."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from pydantic import SecretStr

from config.settings import load_settings
from delivery.braze_client import BrazeClient
from delivery.services import services
from stores.dead_letters import DeadLetters
from tests.conftest import SIM_KEY, come_due, email
from tests.integration.test_poster import email_batch, record

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-Secret-Value-0123456789abcdef"


def test_a_worker_with_such_a_key_stops_at_start_with_one_line(tmp_path):
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith(("BRAZE_", "REDIS_"))
    }
    env.update(BRAZE_API_KEY=f"{KEY} x", BRAZE_REST_ENDPOINT="http://127.0.0.1:9")
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.app", "worker"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert "BRAZE_API_KEY" in result.stderr
    assert "Traceback" not in result.stderr
    assert KEY not in result.stderr + result.stdout


def test_a_transport_error_quoting_the_key_reaches_no_log_record_or_dead_letter(
    sim, env, redis_client, caplog
):
    """A key with a newline that got past validation (a client built by hand): h11 refuses
    the header and its message quotes the whole value; none of it may be kept."""
    secret = f"{SIM_KEY}-{KEY}"
    settings = load_settings(max_attempts=2)
    braze = BrazeClient(sim.url, SecretStr(secret + "\n"), timeout_seconds=5)
    poster = services().poster(braze, settings)
    batch_id = email_batch([email(1), email(2)])
    caplog.set_level(logging.INFO, logger="braze_subs")

    first = poster.post(batch_id)
    assert first.status == "retry"
    assert "Illegal header value" in first.detail  # the error is still useful...
    kept = record(redis_client, batch_id)
    assert kept is not None
    assert secret not in kept["error"] and KEY not in kept["error"]  # ...without the key

    come_due(batch_id)
    assert poster.post(batch_id).status == "dead_lettered"
    [entry] = DeadLetters(redis_client, services().keys).list()
    assert "LocalProtocolError" in entry.error
    assert KEY not in entry.error and "Bearer ***" in entry.error
    assert caplog.records
    assert all(KEY not in r.getMessage() for r in caplog.records)
    braze.close()


def test_url_userinfo_in_a_transport_error_is_scrubbed(sim, env, redis_client):
    """An endpoint with userinfo that cannot be reached: the error may name the URL."""
    settings = load_settings(max_attempts=1)
    braze = BrazeClient(
        "http://operator:hunter2-pass@127.0.0.1:9", SecretStr(SIM_KEY), timeout_seconds=5
    )
    poster = services().poster(braze, settings)
    batch_id = email_batch([email(3)])
    report = poster.post(batch_id)
    assert report.status == "dead_lettered"
    assert report.http_status is None
    [entry] = DeadLetters(redis_client, services().keys).list()
    assert "hunter2" not in entry.error and "hunter2" not in report.detail
    braze.close()


def test_cannot_reach_redis_hides_a_query_password(tmp_path):
    """Issue 21, item 8: `?password=` (which redis-py reads) printed whole before."""
    socket = tmp_path / "nobody-listens.sock"
    for url in (
        f"unix://{socket}?password=s3cret-pw&db=0",
        "redis://127.0.0.1:1/0?password=s3cret-pw",
    ):
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("BRAZE_", "REDIS_"))
        }
        result = subprocess.run(
            [sys.executable, "-m", "worker", "status"],
            cwd=Path(__file__).resolve().parents[2],
            env={**env, "REDIS_URL": url},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode != 0
        assert "cannot reach Redis at" in result.stderr, result.stderr
        assert "password=***" in result.stderr
        assert "s3cret-pw" not in result.stderr + result.stdout
        assert "Traceback" not in result.stderr
