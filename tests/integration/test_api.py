"""The HTTP ingest API as a producer in another language sees it: a real `braze-subs api`
process (`python -m worker api`) on a real Redis, called over HTTP with httpx."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

from admin.exporter import registry_for
from delivery.services import services
from devtools.processes import free_port, local_redis
from stores.keys import Keys
from tests.api_process import IN_FILE, ROTATED, TOKEN, Api, running_api
from tests.conftest import BASE_ENV, ROOT, email, wait_for


@pytest.fixture
def api(env: dict[str, str], tmp_path: Path) -> Iterator[Api]:
    with running_api(env["REDIS_URL"], tmp_path) as running:
        yield running


def row(n: int, state: str = "subscribed", **fields: object) -> dict[str, object]:
    return {
        "subscription_group_id": "newsletter",
        "subscription_state": state,
        "email": email(n),
        **fields,
    }


def pending(redis_client: Redis) -> int:
    return int(redis_client.hlen(Keys(services().settings.redis_key_prefix).pending))


def test_changes_go_in_like_import_rows_with_accepted_and_stale_counts(api, redis_client):
    one = api.post(row(1, occurred_at="2026-01-02T00:00:00Z"))
    assert one.status_code == 202 and one.json() == {"accepted": 1, "stale": 0}
    many = api.post(
        [
            row(2, "unsubscribed"),
            row(3, phone="+1 415 555 0100", email=None),
            # Older than the one accepted above for the same group and identifier.
            row(1, "unsubscribed", occurred_at="2026-01-01T00:00:00Z"),
            {
                "subscription_group_id": "sms",
                "subscription_state": "subscribed",
                "external_id": " user-9 ",
                "use_double_opt_in_logic": True,
                "delay_seconds": 120,
                "lane": "bulk",
            },
        ]
    )
    assert many.status_code == 202 and many.json() == {"accepted": 4, "stale": 1}
    assert pending(redis_client) == 4  # email 1 (subscribed still), 2, the phone, user-9
    due, _ = services().buffer.read_due(now_ms=2**62, limit=10)
    values = {(change.kind.value, change.value, change.state.value) for change in due}
    assert ("email", email(1), "subscribed") in values
    assert ("phone", "+14155550100", "subscribed") in values  # normalised as on import
    assert ("external_id", "user-9", "subscribed") in values


def test_one_bad_row_refuses_the_request_listing_every_bad_row_masked(api, redis_client):
    rows = [
        row(1),
        row(2, "maybe"),
        row(3),
        {
            "subscription_group_id": "newsletter",
            "subscription_state": "subscribed",
            "email": "jane.doe@@example.com",
        },
        "not an object",
        row(5, emial="typo"),
        {
            "subscription_group_id": "sms",
            "subscription_state": "subscribed",
            "phone": "4155550123",
        },  # the reason quotes it: masked
        row(8, lane="fast"),
    ]
    answer = api.post(rows)
    assert answer.status_code == 422
    errors = answer.json()["errors"]
    assert [(e["index"], e["field"]) for e in errors] == [
        (1, "subscription_state"),
        (3, "email"),
        (4, "change"),
        (5, "emial"),
        (6, "phone"),
        (7, "lane"),
    ]
    assert "jane.doe@@example.com" not in answer.text and "jane.doe" not in answer.text
    assert "4155550123" not in answer.text and "got '41*****123'" in errors[-2]["reason"]
    assert pending(redis_client) == 0  # nothing enqueued, not even rows 0 and 2
    assert api.post([]).json() == {"accepted": 0, "stale": 0}
    scalar = api.post(42)
    assert scalar.status_code == 422 and scalar.json()["errors"][0]["field"] == "body"


def test_only_accepted_bearer_tokens_get_in(api, redis_client):
    refused = api.post(row(1), token=None)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert api.post(row(1), token="tok-0123456789abcdeX").status_code == 401
    assert api.post(row(1), headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert pending(redis_client) == 0
    for token in (TOKEN, ROTATED, IN_FILE):  # several at once: rotation
        assert api.post(row(1), token=token).status_code == 202


def test_too_large_and_not_json_are_refused_before_anything_is_enqueued(api, redis_client):
    assert api.post([row(n) for n in range(1001)]).status_code == 413
    huge = json.dumps([row(1, source="x" * 90)] * 5000).encode()  # > 1 MiB (the default)
    assert len(huge) > 1_048_576
    assert api.post(huge).status_code == 413
    assert api.post(row(1), headers={"Content-Type": "text/plain"}).status_code == 415
    assert api.post(b"{'single': 'quotes'}").status_code == 415
    assert api.post(b'{"delay_seconds": NaN}').status_code == 415
    assert api.post(b"[" * 100_000 + b"]" * 100_000).status_code in (413, 415)
    assert pending(redis_client) == 0
    assert api.post([row(n) for n in range(1000)]).json() == {"accepted": 1000, "stale": 0}


def test_a_full_buffer_answers_503_with_retry_after(env, redis_client, tmp_path):
    """API_MAX_PENDING (the setting under test) shortened to 3."""
    with running_api(env["REDIS_URL"], tmp_path, API_MAX_PENDING="3") as api:
        assert api.post([row(1), row(2), row(3)]).status_code == 202
        full = api.post([row(4), row(5)])
        assert full.status_code == 503 and full.headers["retry-after"] == "30"
        assert pending(redis_client) == 3


def test_redis_refusing_writes_answers_503_and_enqueues_nothing(tmp_path):
    with local_redis(tmp_path) as url, running_api(url, tmp_path) as api:
        client = Redis.from_url(url)
        assert httpx.get(f"{api.url}/healthz").json() == {"status": "ok", "redis": "ok"}
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)  # every write refused: out of memory
        refused = api.post([row(n) for n in range(1000)])
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert "OutOfMemoryError" in refused.json()["error"]
        client.config_set("maxmemory", 0)
        assert client.hlen(Keys(BASE_ENV.get("REDIS_KEY_PREFIX", "braze-subs")).pending) == 0
        assert api.post(row(1)).status_code == 202
        client.shutdown(nosave=True)
        gone = api.post(row(2))
        assert gone.status_code == 503 and gone.headers["retry-after"] == "5"
        assert httpx.get(f"{api.url}/healthz").status_code == 503


def test_access_lines_are_json_without_personal_data_or_tokens(api):
    api.post(row(7))
    api.post(row(8, "maybe"))
    api.post(row(9), token="tok-wrong-but-long-enough")
    httpx.get(f"{api.url}/users/{email(9)}")  # a path holding an email is not logged as is

    def access_lines() -> list[dict[str, object]]:
        lines = [json.loads(line) for line in api.log.read_text().splitlines() if line.strip()]
        return [line for line in lines if "status" in line]

    lines = wait_for(lambda: (found := access_lines()) and found[-1]["route"] == "other" and found)
    assert [(line["route"], line["status"]) for line in lines[-4:]] == [
        ("/v1/changes", 202),
        ("/v1/changes", 422),
        ("/v1/changes", 401),
        ("other", 404),
    ]
    text = api.log.read_text()
    for secret in (email(7), email(8), email(9), TOKEN, "tok-wrong-but-long-enough", "example"):
        assert secret not in text


def test_request_metrics_reach_the_exporter(api, redis_client):
    api.post([row(1), row(2)])
    api.post(row(3, "maybe"))
    found = services()

    def exported() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        samples = {}
        for family in registry_for(found.redis, found.keys, None).collect():
            for sample in family.samples:
                if sample.name.startswith("braze_subs_api_"):
                    samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    samples = wait_for(
        lambda: (s := exported()).get(("braze_subs_api_requests_total", (("code", "422"),))) and s
    )
    assert samples[("braze_subs_api_requests_total", (("code", "202"),))] == 1
    assert samples[("braze_subs_api_changes_total", (("outcome", "accepted"),))] == 2
    assert samples[("braze_subs_api_request_duration_seconds_count", ())] >= 2


def test_the_openapi_document_and_health(api):
    document = httpx.get(f"{api.url}/openapi.json").json()
    assert document["openapi"].startswith("3.")
    assert "post" in document["paths"]["/v1/changes"]
    assert httpx.get(f"{api.url}/healthz").status_code == 200


def test_no_token_configured_stops_the_api_at_start_in_one_line(env):
    environ = {**os.environ, **env, "PORT": str(free_port())}
    environ.pop("API_TOKENS", None)
    environ.pop("API_TOKENS_FILE", None)
    result = subprocess.run(
        [sys.executable, "-m", "worker", "api"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "API_TOKENS" in lines[0], result.stderr
