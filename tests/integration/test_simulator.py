"""The Braze simulator, over real HTTP (no mocks)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from simulator import SimulatorConfig, SimulatorServer
from simulator.validation import BOTH_EMAIL_AND_PHONE
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
