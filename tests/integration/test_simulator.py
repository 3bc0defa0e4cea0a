"""The Braze simulator, over real HTTP (no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from devtools.processes import free_port, wait_until
from simulator import SimulatorConfig, SimulatorServer, WorkspacesConfig
from simulator.config_file import ConfigFileError, load_config_file
from simulator.validation import BOTH_EMAIL_AND_PHONE
from tests.cli_runs import assert_one_line_error, run_real
from tests.sim_control import control_client

KEY = "sim-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
V1 = "/subscription/status/set"
V2 = "/v2/subscription/status/set"
GET = "/subscription/status/get"
RATE_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[SimulatorServer]:
    config = SimulatorConfig(
        api_keys={KEY},
        email_groups={"email-a", "email-b"},
        sms_groups={"sms-a", "sms-b"},
    )
    with SimulatorServer(config) as sim:
        yield sim


@pytest.fixture(scope="module")
def auto_server() -> Iterator[SimulatorServer]:
    with SimulatorServer(SimulatorConfig(auto_groups=True)) as sim:
        yield sim


@pytest.fixture
def client(server: SimulatorServer) -> Iterator[httpx.Client]:
    with control_client(server.url, KEY) as http:
        yield http


@pytest.fixture
def auto_client(auto_server: SimulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=auto_server.url, headers=AUTH, timeout=10) as http:
        http.post("/_sim/reset")
        yield http


def faults(http: httpx.Client, **switches: Any) -> dict[str, Any]:
    response = http.post("/_sim/faults", json=switches)
    assert response.status_code == 200, response.text
    return response.json()


def stats(http: httpx.Client, log: bool = True) -> dict[str, Any]:
    return http.get("/_sim/stats", params={} if log else {"log": "0"}).json()


def subscriptions(http: httpx.Client) -> set[tuple[str, str, str, str]]:
    subs = http.get("/_sim/state").json()["subscriptions"]
    return {(s["group"], s["kind"], s["value"], s["state"]) for s in subs}


def v1(group: str, state: str = "subscribed", **identifiers: Any) -> dict[str, Any]:
    return {"subscription_group_id": group, "subscription_state": state, **identifiers}


def entry(group: str, state: str = "subscribed", **identifiers: Any) -> dict[str, Any]:
    return {"subscription_group_id": group, "subscription_state": state, **identifiers}


def v2(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"subscription_groups": list(entries)}


def ids(prefix: str, count: int, start: int = 0) -> list[str]:
    return [f"{prefix}{i}" for i in range(start, start + count)]


# --- auth -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}]
)
def test_unauthorized_requests_get_401_without_the_key(client, headers):
    with httpx.Client(base_url=str(client.base_url), headers=headers) as anonymous:
        response = anonymous.post(V1, json=v1("email-a", external_id="u1"))
        got = anonymous.get(GET, params={"subscription_group_id": "email-a", "external_id": "u1"})
    assert response.status_code == 401
    assert response.json()["message"].startswith("Invalid API key")
    assert "wrong-key" not in response.text
    assert all(name in response.headers for name in RATE_HEADERS)
    assert got.status_code == 401
    assert stats(client)["unauthorized"] == 1
    assert subscriptions(client) == set()


def test_revoked_key_via_faults(client):
    faults(client, api_keys=["new-key"])
    assert client.post(V1, json=v1("email-a", external_id="u1")).status_code == 401
    response = client.post(
        V1, json=v1("email-a", external_id="u1"), headers={"Authorization": "Bearer new-key"}
    )
    assert response.status_code == 201


# --- validation -------------------------------------------------------------------------------

V1_BAD: list[tuple[str, Any, str]] = [
    ("not an object", ["x"], "Request body must be a JSON object"),
    (
        "missing group",
        {"subscription_state": "subscribed", "external_id": "u"},
        "Missing subscription_group_id",
    ),
    (
        "group not a string",
        v1("email-a") | {"subscription_group_id": 7, "external_id": "u"},
        "subscription_group_id must be a non-empty string",
    ),
    (
        "missing state",
        {"subscription_group_id": "email-a", "external_id": "u"},
        "Missing subscription_state",
    ),
    ("bad state", v1("email-a", "maybe", external_id="u"), "subscription_state must be"),
    ("no identifiers", v1("email-a"), "One of external_id, email, phone is required"),
    (
        "email and phone",
        v1("email-a", email="a@example.com", phone="+14155550100"),
        BOTH_EMAIL_AND_PHONE,
    ),
    (
        "external_id wrong type",
        v1("email-a", external_id=5),
        "external_id must be a string or an array of strings",
    ),
    (
        "non-string in list",
        v1("email-a", external_id=["u", 5]),
        "external_id must contain only strings",
    ),
    ("empty list", v1("email-a", external_id=[]), "external_id must not be empty"),
    ("empty string", v1("email-a", external_id=""), "external_id must not contain empty strings"),
    ("51 in a list", v1("email-a", external_id=ids("u", 51)), "Too many identifiers"),
    (
        "51 emails",
        v1("email-a", email=[f"u{i}@example.com" for i in range(51)]),
        "Too many identifiers",
    ),
    ("email in SMS group", v1("sms-a", email="a@example.com"), "sms-a is an SMS group"),
    ("phone in email group", v1("email-a", phone="+14155550100"), "email-a is an email group"),
    ("phone without plus", v1("sms-a", phone="14155550100"), "Invalid phone: 14155550100"),
    ("phone with spaces", v1("sms-a", phone="+1 415 555 0100"), "Invalid phone: +1 415 555 0100"),
    ("phone leading zero", v1("sms-a", phone="+0415550100"), "Invalid phone: +0415550100"),
    ("phone unknown country", v1("sms-a", phone="+999123456"), "Invalid phone: +999123456"),
    ("phone too long", v1("sms-a", phone="+1234567890123456"), "Invalid phone"),
    ("bad email", v1("email-a", email="not-an-email"), "Invalid email: not-an-email"),
    ("bad email in list", v1("email-a", email=["a@example.com", "b@"]), "Invalid email: b@"),
    (
        "double opt-in not bool",
        v1("sms-a", phone="+14155550100", use_double_opt_in_logic="yes"),
        "use_double_opt_in_logic must be a boolean",
    ),
    ("unknown field", v1("email-a", external_id="u", extra=1), "Unknown field: extra"),
    ("v2 field name in v1", v1("email-a", external_ids=["u"]), "Unknown field: external_ids"),
    ("unknown group", v1("nope", external_id="u"), "Unknown subscription_group_id: nope"),
]

V2_BAD: list[tuple[str, Any, str]] = [
    ("not an object", "x", "Request body must be a JSON object"),
    ("missing groups", {}, "Missing subscription_groups"),
    ("empty groups", v2(), "subscription_groups must be a non-empty array"),
    (
        "groups not array",
        {"subscription_groups": {}},
        "subscription_groups must be a non-empty array",
    ),
    (
        "entry not object",
        {"subscription_groups": ["x"]},
        "subscription_groups[0] must be an object",
    ),
    (
        "unknown top-level",
        v2(entry("email-a", external_ids=["u"])) | {"extra": 1},
        "Unknown field: extra",
    ),
    (
        "unknown entry field",
        v2(entry("email-a", external_id=["u"])),
        "subscription_groups[0]: Unknown field: external_id",
    ),
    (
        "missing state",
        v2({"subscription_group_id": "email-a", "external_ids": ["u"]}),
        "Missing subscription_state",
    ),
    ("bad state", v2(entry("email-a", "on", external_ids=["u"])), "subscription_state must be"),
    (
        "missing group",
        v2({"subscription_state": "subscribed", "external_ids": ["u"]}),
        "Missing subscription_group_id",
    ),
    ("no identifiers", v2(entry("email-a")), "One of external_ids, emails, phones is required"),
    (
        "string not array",
        v2(entry("email-a", external_ids="u")),
        "external_ids must be an array of strings",
    ),
    (
        "emails not array",
        v2(entry("email-a", emails="a@example.com")),
        "emails must be an array of strings",
    ),
    ("empty list", v2(entry("email-a", external_ids=[])), "external_ids must not be empty"),
    (
        "emails and phones",
        v2(entry("email-a", emails=["a@example.com"], phones=["+14155550100"])),
        BOTH_EMAIL_AND_PHONE,
    ),
    ("51 in one list", v2(entry("email-a", external_ids=ids("u", 51))), "Too many identifiers"),
    (
        "51 distinct across entries",
        v2(
            entry("email-a", external_ids=ids("u", 30)),
            entry("sms-a", external_ids=ids("u", 21, 30)),
        ),
        "Too many identifiers",
    ),
    ("emails in SMS group", v2(entry("sms-a", emails=["a@example.com"])), "sms-a is an SMS group"),
    (
        "phones in email group",
        v2(entry("email-a", phones=["+14155550100"])),
        "email-a is an email group",
    ),
    (
        "mix with emails",
        v2(entry("email-a", emails=["a@example.com"]), entry("sms-a", external_ids=["u"])),
        "cannot mix email and SMS",
    ),
    (
        "mix with phones",
        v2(entry("email-a", external_ids=["u"]), entry("sms-a", phones=["+14155550100"])),
        "cannot mix email and SMS",
    ),
    ("bad email", v2(entry("email-a", emails=["nope"])), "Invalid email: nope"),
    ("bad phone", v2(entry("sms-a", phones=["+1415"])), "Invalid phone: +1415"),
    (
        "double opt-in not bool",
        v2(entry("sms-a", phones=["+14155550100"], use_double_opt_in_logic=1)),
        "use_double_opt_in_logic must be a boolean",
    ),
    ("unknown group", v2(entry("nope", external_ids=["u"])), "Unknown subscription_group_id: nope"),
    (
        "second entry bad",
        v2(entry("email-a", external_ids=["u"]), entry("email-b", "x", external_ids=["u"])),
        "subscription_groups[1]: subscription_state",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [pytest.param(V1, body, msg, id=f"v1-{name}") for name, body, msg in V1_BAD]
    + [pytest.param(V2, body, msg, id=f"v2-{name}") for name, body, msg in V2_BAD],
)
def test_bad_bodies_are_rejected_with_400(client, path, body, message):
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["message"]
    assert all(name in response.headers for name in RATE_HEADERS)
    assert subscriptions(client) == set()
    counters = stats(client, log=False)
    assert counters["malformed"] == counters["rejected_400"] == 1


def test_email_and_phone_message_is_exactly_brazes(client):
    response = client.post(V1, json=v1("sms-a", email="a@example.com", phone="+14155550100"))
    assert response.json() == {
        "message": "Either an email address or a phone number should be provided, but not both."
    }


@pytest.mark.parametrize("content", [b"not json", b"{", b"\xff\xfe"])
def test_non_json_body_is_400(client, content):
    response = client.post(V1, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert stats(client)["malformed"] == 1


@pytest.mark.parametrize("method", ["GET", "PUT"])
@pytest.mark.parametrize("path", [V1, V2])
def test_other_methods_on_the_post_paths_are_405(client, method, path):
    """The posts are served ahead of the routing (`BrazePosts`, issue 26); any other method
    still reaches the routes and their 405, nothing counted."""
    response = client.request(method, path, json=v1("email-a", email="a@example.com"))
    assert (response.status_code, response.headers["allow"]) == (405, "POST")
    assert stats(client)["requests_total"] == 0


def test_a_post_to_the_path_with_a_slash_is_redirected_as_before(client):
    response = client.post(V1 + "/", json=v1("email-a", email="a@example.com"))
    assert response.status_code == 307
    assert response.headers["location"].endswith(V1)
    assert stats(client)["requests_total"] == 0


# --- good requests change state ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "field", "value"),
    [
        ("email-a", "external_id", "user-1"),
        ("email-a", "email", "user@example.com"),
        ("sms-a", "phone", "+14155550100"),
        ("sms-a", "external_id", "user-2"),
    ],
)
def test_v1_post_sets_state_for_each_kind(client, group, field, value):
    response = client.post(V1, json=v1(group, **{field: value}))
    assert response.status_code == 201
    assert response.json() == {"message": "success"}
    assert subscriptions(client) == {(group, field, value, "subscribed")}
    got = client.get(GET, params={"subscription_group_id": group, field: [value, "other"]})
    assert got.json() == {"status": {value: "subscribed", "other": "unknown"}, "message": "success"}

    assert client.post(V1, json=v1(group, "unsubscribed", **{field: [value]})).status_code == 201
    assert subscriptions(client) == {(group, field, value, "unsubscribed")}
    got = client.get(GET, params={"subscription_group_id": group, field: value})
    assert got.json()["status"] == {value: "unsubscribed"}


def test_v1_lists_with_duplicates_and_double_opt_in(client):
    body = v1("sms-a", phone=["+14155550100", "+14155550100"], use_double_opt_in_logic=True)
    assert client.post(V1, json=body).status_code == 201
    state = client.get("/_sim/state").json()
    assert state["subscriptions"] == [
        {
            "group": "sms-a",
            "kind": "phone",
            "value": "+14155550100",
            "state": "subscribed",
            "double_opt_in": True,
            "updates": 1,
        }
    ]
    [record] = state["stats"]["requests"]
    assert record["endpoint"] == "v1"
    assert (record["identifiers"], record["entries"], record["status"]) == (1, 1, 201)
    assert isinstance(record["t"], float)


def test_v2_shared_external_ids_count_once(client):
    body = v2(
        entry("email-a", external_ids=ids("u", 40)),
        entry("sms-a", "unsubscribed", external_ids=ids("u", 40, 10)),
    )
    response = client.post(V2, json=body)
    assert response.status_code == 201, response.text
    subs = subscriptions(client)
    assert len(subs) == 80
    assert ("email-a", "external_id", "u0", "subscribed") in subs
    assert ("sms-a", "external_id", "u49", "unsubscribed") in subs
    [record] = stats(client)["requests"]
    assert (record["endpoint"], record["identifiers"], record["entries"]) == ("v2", 50, 2)


def test_v2_51_distinct_is_400_and_changes_nothing(client):
    body = v2(
        entry("email-a", external_ids=ids("u", 26)), entry("email-b", external_ids=ids("v", 25))
    )
    response = client.post(V2, json=body)
    assert response.status_code == 400
    assert "Too many identifiers" in response.json()["message"]
    assert subscriptions(client) == set()


def test_v2_group_mix_allowed_with_external_ids_only(client):
    body = v2(entry("email-a", external_ids=["u1"]), entry("sms-a", external_ids=["u1"]))
    assert client.post(V2, json=body).status_code == 201
    mixed = v2(entry("email-a", emails=["a@example.com"]), entry("sms-a", external_ids=["u1"]))
    assert client.post(V2, json=mixed).status_code == 400
    same_channel = v2(
        entry("email-a", emails=["a@example.com"]),
        entry("email-b", "unsubscribed", emails=["a@example.com"], external_ids=["u9"]),
    )
    assert client.post(V2, json=same_channel).status_code == 201
    assert len(subscriptions(client)) == 5


def test_auto_groups_learn_their_channel(auto_client):
    http = auto_client
    assert http.post(V1, json=v1("new-email", email="a@example.com")).status_code == 201
    response = http.post(V1, json=v1("new-email", phone="+14155550100"))
    assert response.status_code == 400
    assert "email group" in response.json()["message"]
    # external_id only: accepted, channel still open
    assert http.post(V1, json=v1("open", external_id="u1")).status_code == 201
    assert http.post(V2, json=v2(entry("open", phones=["+14155550100"]))).status_code == 201
    assert http.post(V1, json=v1("open", email="a@example.com")).status_code == 400
    got = http.get(GET, params={"subscription_group_id": "anything", "external_id": "u1"})
    assert got.json()["status"] == {"u1": "unknown"}


# --- rate limit -------------------------------------------------------------------------------


def test_rate_limit_headers_on_every_response(client):
    faults(client, rate_limit=2, window_seconds=3600)
    responses = [
        client.post(V1, json=v1("email-a", external_id="u1")),  # 201
        client.post(V1, json={"bad": 1}),  # 400
        client.post(V1, json=v1("email-a", external_id="u1")),  # 429
        client.post(V1, json={}, headers={"Authorization": "Bearer nope"}),  # 401
    ]
    assert [r.status_code for r in responses] == [201, 400, 429, 401]
    for response in responses:
        raw_names = {name.lower() for name, _ in response.headers.raw}
        assert raw_names.issuperset(n.encode() for n in RATE_HEADERS)
        assert response.headers["X-RateLimit-Limit"] == "2"
        assert int(response.headers["x-ratelimit-reset"]) % 3600 == 0
    assert [r.headers["X-RateLimit-Remaining"] for r in responses] == ["1", "0", "0", "0"]
    assert "retry-after" not in responses[2].headers
    assert responses[2].json() == {"message": "Rate limit exceeded"}


def test_429_once_over_the_limit_then_accepted_after_reset(client):
    faults(client, rate_limit=5, window_seconds=2)
    by_window: dict[int, list[int]] = {}
    for i in range(12):
        response = client.post(V1, json=v1("email-a", external_id=f"u{i}"))
        by_window.setdefault(int(response.headers["X-RateLimit-Reset"]), []).append(
            response.status_code
        )
        if response.status_code == 429:
            break
    reset, statuses = max(by_window.items())
    assert statuses == [201] * 5 + [429], by_window
    assert reset % 2 == 0 and reset > time.time() - 0.1
    counters = stats(client, log=False)
    assert counters["max_requests_in_window"] == 5  # the 429 consumed nothing
    assert counters["rate_limited_429"] == 1

    time.sleep(max(0.0, reset - time.time()) + 0.05)
    response = client.post(V1, json=v1("email-a", external_id="late"))
    assert response.status_code == 201
    assert int(response.headers["X-RateLimit-Reset"]) > reset


def test_status_get_does_not_spend_the_budget(client):
    faults(client, rate_limit=1, window_seconds=3600)
    for _ in range(3):
        got = client.get(GET, params={"subscription_group_id": "email-a", "external_id": "u"})
        assert got.status_code == 200
    assert client.post(V1, json=v1("email-a", external_id="u")).status_code == 201


def test_spend_consumes_the_window_like_another_client(client):
    state = faults(client, rate_limit=5, window_seconds=3600, spend=3)
    assert (state["rate_limit"], state["window_seconds"]) == (5, 3600)
    first = client.post(V1, json=v1("email-a", external_id="u1"))
    assert (first.status_code, first.headers["X-RateLimit-Remaining"]) == (201, "1")
    assert client.post(V1, json=v1("email-a", external_id="u2")).status_code == 201
    assert client.post(V1, json=v1("email-a", external_id="u3")).status_code == 429
    assert stats(client, log=False)["window_requests"] == 5


# --- faults -----------------------------------------------------------------------------------


def test_outage_answers_503_and_changes_nothing(client):
    faults(client, outage=True)
    response = client.post(V2, json=v2(entry("email-a", external_ids=["u1"])))
    assert response.status_code == 503
    assert all(name in response.headers for name in RATE_HEADERS)
    assert subscriptions(client) == set()
    assert stats(client, log=False)["server_errors"] == 1
    faults(client, outage=False)
    assert client.post(V2, json=v2(entry("email-a", external_ids=["u1"]))).status_code == 201


def test_error_rate_one_answers_500(client):
    faults(client, error_rate=1.0)
    for _ in range(3):
        response = client.post(V1, json=v1("email-a", external_id="u1"))
        assert response.status_code == 500
        assert all(name in response.headers for name in RATE_HEADERS)
    assert subscriptions(client) == set()
    counters = stats(client, log=False)
    assert (counters["server_errors"], counters["requests_total"]) == (3, 3)


def test_latency_delays_answers(client):
    faults(client, latency_ms=300)
    started = time.monotonic()
    assert client.post(V1, json=v1("email-a", external_id="u1")).status_code == 201
    assert time.monotonic() - started >= 0.3


def test_reject_names_the_identifier(client):
    faults(client, reject=["bad@example.com"])
    body = v2(entry("email-a", emails=["good@example.com", "bad@example.com"]))
    response = client.post(V2, json=body)
    assert response.status_code == 400
    assert response.json() == {"message": "Invalid email: bad@example.com"}
    assert subscriptions(client) == set()
    ok = client.post(V2, json=v2(entry("email-a", emails=["good@example.com"])))
    assert ok.status_code == 201
    counters = stats(client, log=False)
    assert (counters["rejected_400"], counters["malformed"], counters["requests_ok"]) == (1, 0, 1)


def test_hold_keeps_responses_pending_until_released(client, server):
    faults(client, hold=True)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(
            httpx.post, f"{server.url}{V1}", json=v1("email-a", external_id="u1"), headers=AUTH
        )
        deadline = time.monotonic() + 5
        while stats(client, log=False)["held"] != 1:
            assert time.monotonic() < deadline, "request never held"
            assert not pending.done()
        assert not pending.done()
        assert stats(client, log=False)["requests_total"] == 1
        faults(client, hold=False)
        assert pending.result(timeout=5).status_code == 201
    assert stats(client, log=False)["held"] == 0
    assert subscriptions(client) == {("email-a", "external_id", "u1", "subscribed")}


def test_reset_clears_state_counters_and_faults(client):
    assert client.post(V1, json=v1("email-a", external_id="u1")).status_code == 201
    faults(client, outage=True, latency_ms=5, reject=["x"], api_keys=["other"], rate_limit=9)
    faults(client, reject_anonymous=["y"], reject_groups=["g"], soft_errors=["z"], queued=True)
    faults(client, read_rate_limit=3, read_window_seconds=5, legacy_reads=True)
    faults(client, answer="html", nested_depth=5, huge_bytes=7, trickle_ms=1)
    faults(client, absurd_rate_limit_headers=True)
    assert client.post("/_sim/reset").status_code == 200
    assert subscriptions(client) == set()
    counters = stats(client)
    assert counters["requests_total"] == counters["max_requests_in_window"] == 0
    assert counters["requests"] == []
    assert client.get("/_sim/faults").json() == {
        "outage": False,
        "error_rate": 0.0,
        "latency_ms": 0,
        "reject": [],
        "api_keys": [KEY],
        "hold": False,
        "rate_limit": 5000,
        "window_seconds": 60,
        "read_rate_limit": 250_000,
        "read_window_seconds": 3600,
        "reject_anonymous": [],
        "reject_groups": [],
        "soft_errors": [],
        "queued": False,
        "legacy_reads": False,
        "answer": None,
        "nested_depth": 100_000,
        "huge_bytes": 30 * 1024 * 1024,
        "trickle_ms": 200.0,
        "absurd_rate_limit_headers": False,
    }
    assert client.post(V1, json=v1("email-a", external_id="u1")).status_code == 201


@pytest.mark.parametrize(
    "body",
    [
        {"outage": "yes"},
        {"error_rate": 2},
        {"reject": "x"},
        {"rate_limit": 0},
        {"nope": 1},
        {"reject_anonymous": [1]},
        {"read_rate_limit": 0},
        {"read_window_seconds": -1},
        {"read_spend": -1},
        {"legacy_reads": 1},
        {"answer": "teapot"},
        {"nested_depth": 0},
        {"huge_bytes": True},
        {"trickle_ms": -1},
        {"absurd_rate_limit_headers": "yes"},
    ],
)
def test_bad_fault_bodies_are_400(client, body):
    assert client.post("/_sim/faults", json=body).status_code == 400


@pytest.mark.parametrize(
    ("answer", "status", "content_type"),
    [
        ("html", 200, "text/html"),
        ("redirect", 301, "text/plain"),
        ("nested", 201, "application/json"),
        ("huge", 500, "text/plain"),
    ],
)
def test_answers_that_are_not_brazes_apply_nothing(client, server, answer, status, content_type):
    faults(client, answer=answer, huge_bytes=1000, nested_depth=50)
    response = client.post(V1, json=v1("email-a", external_id="u1"))
    assert response.status_code == status
    assert response.headers["content-type"].startswith(content_type)
    if answer == "redirect":
        assert response.headers["location"].startswith("https://elsewhere.invalid/")
    if answer == "huge":
        assert len(response.content) == 1000
    assert subscriptions(client) == set()
    counters = stats(client, log=False)
    assert counters["requests_ok"] == 0 and counters["requests_total"] == 1


def test_a_trickled_answer_is_brazes_applied_and_slow(client):
    faults(client, answer="trickle", trickle_ms=20, absurd_rate_limit_headers=True)
    started = time.monotonic()
    response = client.post(V1, json=v1("email-a", external_id="u1"))
    assert response.status_code == 201 and response.json() == {"message": "success"}
    assert time.monotonic() - started >= 20 * len(response.content) / 1000 * 0.9
    assert response.headers["x-ratelimit-reset"] == "1e308"
    assert subscriptions(client) == {("email-a", "external_id", "u1", "subscribed")}


def test_stats_log_can_be_omitted(client):
    client.post(V1, json=v1("email-a", external_id="u1"))
    assert "requests" not in stats(client, log=False)
    full = client.get("/_sim/state").json()
    assert len(full["stats"]["requests"]) == 1
    assert "requests" not in client.get("/_sim/state", params={"log": "0"}).json()["stats"]
    assert json.loads(client.get("/_sim/health").text) == {"status": "ok"}


def test_server_in_process_state_and_config_errors():
    with pytest.raises(ValueError, match="error_rate"):
        SimulatorConfig(error_rate=2)
    with pytest.raises(ValueError, match="both email and SMS"):
        SimulatorConfig(email_groups={"g"}, sms_groups={"g"})
    with SimulatorServer(SimulatorConfig(sms_groups={"s"})) as sim:
        assert sim.url.startswith("http://127.0.0.1:") and sim.port > 0
        response = httpx.post(f"{sim.url}{V1}", json=v1("s", phone="+14155550100"), headers=AUTH)
        assert response.status_code == 201
        assert sim.state.status("s", "phone", "+14155550100") == "subscribed"


# --- several workspaces in one simulator (issue 23) -------------------------------------------

US_KEY, EU_KEY = "us-key", "eu-key"
US, EU = {"Authorization": f"Bearer {US_KEY}"}, {"Authorization": f"Bearer {EU_KEY}"}


@pytest.fixture(scope="module")
def two_workspaces() -> Iterator[SimulatorServer]:
    config = WorkspacesConfig(
        {
            "us": SimulatorConfig(api_keys={US_KEY}, email_groups={"us-news"}),
            "eu": SimulatorConfig(
                api_keys={EU_KEY}, email_groups={"eu-news"}, rate_limit=2, read_rate_limit=1
            ),
        }
    )
    with SimulatorServer(config) as sim:
        yield sim


@pytest.fixture
def both(two_workspaces: SimulatorServer) -> Iterator[httpx.Client]:
    """A client without a key (each request sends its workspace's); every workspace reset."""
    with httpx.Client(base_url=two_workspaces.url, timeout=10) as http:
        assert http.post("/_sim/reset").status_code == 200
        yield http
        http.post("/_sim/reset")


def ws_get(http: httpx.Client, path: str, workspace: str | None, **params: Any) -> Any:
    if workspace is not None:
        params["workspace"] = workspace
    response = http.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def ws_subscriptions(http: httpx.Client, workspace: str | None) -> set[tuple[str, str, str, str]]:
    subs = ws_get(http, "/_sim/state", workspace)["subscriptions"]
    return {(s["group"], s["kind"], s["value"], s["state"]) for s in subs}


def ws_faults(http: httpx.Client, workspace: str, **switches: Any) -> httpx.Response:
    return http.post("/_sim/faults", params={"workspace": workspace}, json=switches)


def test_the_key_selects_the_workspace_and_its_groups(both, two_workspaces):
    assert ws_get(both, "/_sim/workspaces", None) == {"workspaces": ["us", "eu"]}
    assert both.post(V1, json=v1("us-news", external_id="u1"), headers=US).status_code == 201
    assert both.post(V1, json=v1("eu-news", external_id="u2"), headers=EU).status_code == 201
    # A group of the other workspace is unknown here, as in Braze.
    refused = both.post(V1, json=v1("us-news", external_id="u3"), headers=EU)
    assert refused.status_code == 400
    assert refused.json() == {"message": "Unknown subscription_group_id: us-news"}
    assert ws_subscriptions(both, "us") == {("us-news", "external_id", "u1", "subscribed")}
    assert ws_subscriptions(both, "eu") == {("eu-news", "external_id", "u2", "subscribed")}
    assert ws_subscriptions(both, None) == ws_subscriptions(both, "us")  # the first by default
    assert two_workspaces.workspace("eu").status("eu-news", "external_id", "u2") == "subscribed"
    assert two_workspaces.state is two_workspaces.workspace("us")
    read = both.get(GET, params={"subscription_group_id": "us-news", "external_id": "u1"})
    assert read.status_code == 401  # no key: no workspace answers
    read = both.get(
        GET, params={"subscription_group_id": "us-news", "external_id": "u1"}, headers=US
    )
    assert read.json()["status"] == {"u1": "subscribed"}
    us, eu = ws_get(both, "/_sim/stats", "us"), ws_get(both, "/_sim/stats", "eu")
    assert (us["requests_ok"], us["rejected_400"]) == (1, 0)
    assert (eu["requests_ok"], eu["rejected_400"]) == (1, 1)
    applied = ws_get(both, "/_sim/applied", "eu")["applied"]
    assert [(a["group"], a["value"]) for a in applied] == [("eu-news", "u2")]


def test_each_workspace_spends_its_own_budgets(both):
    for n in range(2):
        assert both.post(V1, json=v1("eu-news", external_id=f"e{n}"), headers=EU).status_code == 201
    limited = both.post(V1, json=v1("eu-news", external_id="e2"), headers=EU)
    assert limited.status_code == 429
    assert limited.headers["x-ratelimit-limit"] == "2"
    # The other workspace's budget is untouched by the first's spending.
    ok = both.post(V1, json=v1("us-news", external_id="u1"), headers=US)
    assert ok.status_code == 201
    assert (ok.headers["x-ratelimit-limit"], ok.headers["x-ratelimit-remaining"]) == (
        "5000",
        "4999",
    )
    query = {"subscription_group_id": "eu-news", "external_id": "e0"}
    assert both.get(GET, params=query, headers=EU).status_code == 200
    assert both.get(GET, params=query, headers=EU).status_code == 429  # eu's read budget is 1
    query = {"subscription_group_id": "us-news", "external_id": "u1"}
    assert both.get(GET, params=query, headers=US).status_code == 200
    eu, us = ws_get(both, "/_sim/stats", "eu"), ws_get(both, "/_sim/stats", "us")
    assert (eu["rate_limited_429"], eu["window_requests"], eu["reads"]["rate_limited_429"]) == (
        1,
        2,
        1,
    )
    assert (us["rate_limited_429"], us["window_requests"], us["reads"]["requests_ok"]) == (0, 1, 1)


def test_a_fault_switched_in_one_workspace_leaves_the_other_alone(both):
    assert ws_faults(both, "eu", outage=True, latency_ms=1).status_code == 200
    assert both.post(V1, json=v1("eu-news", external_id="e1"), headers=EU).status_code == 503
    assert both.post(V1, json=v1("us-news", external_id="u1"), headers=US).status_code == 201
    assert ws_get(both, "/_sim/faults", "eu")["outage"] is True
    assert ws_get(both, "/_sim/faults", "us")["outage"] is False
    assert ws_get(both, "/_sim/faults", None)["outage"] is False
    assert ws_get(both, "/_sim/stats", "eu")["server_errors"] == 1
    assert ws_get(both, "/_sim/stats", "us")["server_errors"] == 0
    # reset with ?workspace= resets that one alone; without, every workspace.
    assert ws_faults(both, "us", reject=["x"]).status_code == 200
    assert both.post("/_sim/reset", params={"workspace": "eu"}).status_code == 200
    assert ws_get(both, "/_sim/faults", "eu")["outage"] is False
    assert ws_get(both, "/_sim/faults", "us")["reject"] == ["x"]
    assert ws_subscriptions(both, "us") != set()
    assert both.post("/_sim/reset").status_code == 200
    assert ws_get(both, "/_sim/faults", "us")["reject"] == []
    assert ws_subscriptions(both, "us") == set()


def test_a_refused_key_is_counted_in_the_workspace_that_refused_it(both):
    assert ws_faults(both, "eu", api_keys=["eu-new"]).status_code == 200
    old = both.post(V1, json=v1("eu-news", external_id="e1"), headers=EU)
    assert old.status_code == 401 and EU_KEY not in old.text
    new = {"Authorization": "Bearer eu-new"}
    assert both.post(V1, json=v1("eu-news", external_id="e1"), headers=new).status_code == 201
    assert both.post(V1, json=v1("us-news", external_id="u1"), headers=US).status_code == 201
    stranger = {"Authorization": "Bearer never-seen"}
    assert both.post(V1, json=v1("us-news", external_id="u2"), headers=stranger).status_code == 401
    assert ws_get(both, "/_sim/stats", "eu")["unauthorized"] == 1
    assert ws_get(both, "/_sim/stats", "us")["unauthorized"] == 1  # the stranger: the first's
    # A key is one workspace's: giving it to another too is refused, naming no key.
    taken = ws_faults(both, "us", api_keys=[US_KEY, "eu-new"])
    assert taken.status_code == 400
    assert taken.json() == {"message": "api_keys: workspace eu accepts one of these keys already"}
    assert ws_get(both, "/_sim/faults", "us")["api_keys"] == [US_KEY]


def test_set_state_and_unknown_workspaces(both):
    body = {
        "group": "eu-news",
        "kind": "email",
        "values": ["a@example.com"],
        "state": "unsubscribed",
    }
    set_ok = both.post("/_sim/set_state", params={"workspace": "eu"}, json=body)
    assert set_ok.status_code == 200
    assert ws_subscriptions(both, "eu") == {("eu-news", "email", "a@example.com", "unsubscribed")}
    assert both.post("/_sim/set_state", json=body).status_code == 400  # us has no eu-news
    for method, path in [("GET", "/_sim/stats"), ("POST", "/_sim/faults"), ("POST", "/_sim/reset")]:
        response = both.request(method, path, params={"workspace": "apac"}, json={})
        assert response.status_code == 404
        assert response.json() == {"message": "Unknown workspace: apac (this simulator has us, eu)"}


def test_workspaces_config_refuses_a_shared_key_and_bad_names():
    shared = SimulatorConfig(api_keys={"k"})
    with pytest.raises(ValueError, match=r"^workspaces a and b accept the same API key$"):
        WorkspacesConfig({"a": shared, "b": SimulatorConfig(api_keys={"k", "other"})})
    with pytest.raises(ValueError, match="workspace name 'a b'"):
        WorkspacesConfig({"a b": shared})
    with pytest.raises(ValueError, match="at least one workspace"):
        WorkspacesConfig({})


# --- `braze-subs simulate --config FILE` ------------------------------------------------------

CONFIG_FILE = """
[workspaces.us]
api_keys = ["us-key"]
email_groups = ["us-news"]

[workspaces.eu]
api_keys = ["eu-key", "eu-key-2"]
auto_groups = true
rate_limit = 3
"""


def test_simulate_serves_the_workspaces_of_its_config_file(tmp_path):
    path = tmp_path / "sim.toml"
    path.write_text(CONFIG_FILE)
    port = free_port()
    command = [sys.executable, "-m", "worker", "simulate", "--port", str(port)]
    options = ["--config", str(path), "--rate-limit", "7", "--no-auto-groups"]
    process = subprocess.Popen(
        [*command, *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/_sim/health").status_code == 200
        except httpx.TransportError:
            assert process.poll() is None, f"braze-subs simulate exited: {process.stderr}"
            return False

    try:
        wait_until(healthy, timeout=30, what="braze-subs simulate --config")
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get("/_sim/workspaces").json() == {"workspaces": ["us", "eu"]}
            us = http.post(V1, json=v1("us-news", external_id="u"), headers=US)
            # Unset in the table: the command line's --rate-limit 7.
            assert (us.status_code, us.headers["x-ratelimit-limit"]) == (201, "7")
            eu = http.post(V1, json=v1("any-group", external_id="e"), headers=EU)
            assert (eu.status_code, eu.headers["x-ratelimit-limit"]) == (201, "3")
            second = {"Authorization": "Bearer eu-key-2"}
            assert (
                http.post(V1, json=v1("eu-2", external_id="e"), headers=second).status_code == 201
            )
            # us learns no group (--no-auto-groups), eu does (its table's auto_groups).
            refused = http.post(V1, json=v1("any-group", external_id="u"), headers=US)
            assert refused.json() == {"message": "Unknown subscription_group_id: any-group"}
            stats_of = {
                name: http.get("/_sim/stats", params={"workspace": name, "log": "0"}).json()
                for name in ("us", "eu")
            }
            assert (stats_of["us"]["requests_ok"], stats_of["us"]["rejected_400"]) == (1, 1)
            assert (stats_of["eu"]["requests_ok"], stats_of["eu"]["rejected_400"]) == (2, 0)
    finally:
        process.terminate()
        process.wait(timeout=10)


BAD_CONFIGS = [
    ("", "no [workspaces.NAME] table"),
    ("title = 'x'\n[workspaces.a]\napi_keys = ['k']", "unknown key 'title'"),
    ("[workspaces.a]\nemail_groups = ['g']", "[workspaces.a] api_keys: missing"),
    ("[workspaces.a]\napi_keys = []", "[workspaces.a] api_keys: must be a non-empty array"),
    ("[workspaces.a]\napi_keys = ['k']\nrate_limit = '5'", "[workspaces.a] rate_limit: must be an"),
    ("[workspaces.a]\napi_keys = ['k']\nrate_limit = 0", "[workspaces.a] rate_limit must be at"),
    ("[workspaces.a]\napi_keys = ['k']\nratelimit = 5", "[workspaces.a] ratelimit: unknown field"),
    (
        "[workspaces.a]\napi_keys = ['k']\nemail_groups = ['g']\nsms_groups = ['g']",
        "[workspaces.a] groups cannot be both email and SMS groups",
    ),
    (
        "[workspaces.a]\napi_keys = ['secret-k']\n[workspaces.b]\napi_keys = ['secret-k']",
        "[workspaces.b] api_keys: a key [workspaces.a] accepts too",
    ),
    ("[workspaces.'a b']\napi_keys = ['k']", "[workspaces.a b]: the name must be"),
    ("[workspaces.a]\napi_keys = ['k'\n", "not valid TOML"),
    ("[workspaces]\na = 1", "[workspaces.a] must be a table"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
def test_a_bad_config_file_is_one_line_naming_table_and_field(tmp_path, text, message):
    path = tmp_path / "sim.toml"
    path.write_text(text)
    with pytest.raises(ConfigFileError) as refused:
        load_config_file(path, SimulatorConfig())
    assert message in str(refused.value)
    assert "\n" not in str(refused.value) and "secret-k" not in str(refused.value)


def test_simulate_refuses_a_bad_config_file_in_one_line(tmp_path):
    path = tmp_path / "sim.toml"
    path.write_text("[workspaces.eu]\napi_keys = ['secret-k']\nwindow_seconds = -1\n")
    result = run_real("simulate", "--config", str(path))
    assert_one_line_error(result, "simulate: [workspaces.eu] window_seconds must be positive")
    assert result.returncode == 1 and "secret-k" not in result.stderr
    missing = run_real("simulate", "--config", str(tmp_path / "none.toml"))
    assert_one_line_error(missing, "none.toml: cannot read")
    both_ways = run_real("simulate", "--config", str(path), "--api-key", "k")
    assert_one_line_error(both_ways, "simulate: --api-key does not apply with --config")


# --- the fixtures of two workspaces on two simulators (tests/conftest.py) ----------------------


def test_workspaces_env_names_two_simulators_each_with_its_own_key(workspaces_env):
    tables = tomllib.loads(workspaces_env.file.read_text())["workspaces"]
    assert list(tables) == ["us", "eu"]
    assert os.environ["BRAZE_WORKSPACES_FILE"] == str(workspaces_env.file)
    assert "BRAZE_API_KEY" not in os.environ and "BRAZE_API_KEY" not in workspaces_env
    urls = {tables[name]["rest_endpoint"] for name in tables}
    assert len(urls) == 2
    for name, table in tables.items():
        assert table["groups"] == list(workspaces_env.groups[name])
        key = os.environ[table["api_key_env"]]
        assert workspaces_env[table["api_key_env"]] == key == workspaces_env.keys[name]
        other = next(url for url in urls if url != table["rest_endpoint"])
        body = v1(table["groups"][0], external_id="u1")
        headers = {"Authorization": f"Bearer {key}"}
        assert (
            httpx.post(f"{table['rest_endpoint']}{V1}", json=body, headers=headers).status_code
            == 201
        )
        assert httpx.post(f"{other}{V1}", json=body, headers=headers).status_code == 401


def test_workspaces_env_writes_more_fields_on_request(workspaces_env):
    workspaces_env.write(us={"rate_limit": 40, "rate_limit_window_seconds": 2.0})
    tables = tomllib.loads(workspaces_env.file.read_text())["workspaces"]
    assert (tables["us"]["rate_limit"], tables["us"]["rate_limit_window_seconds"]) == (40, 2.0)
    assert "rate_limit" not in tables["eu"]
    assert tables["eu"]["groups"] == ["eu-email", "eu-sms"]
