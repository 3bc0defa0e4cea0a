"""The simulator's read endpoints, read budget, applied-states log and the faults added for
the order oracle and the read-back features — over real HTTP (no mocks)."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devtools.processes import free_port, wait_until
from simulator import SimulatorConfig, SimulatorServer
from simulator.order_check import (
    applied_from_document,
    applied_from_state,
    check_order,
    enqueued_from_rows,
)
from tests.sim_control import control_client

KEY = "sim-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
V1 = "/subscription/status/set"
V2 = "/v2/subscription/status/set"
GET = "/subscription/status/get"
USER = "/subscription/user/status"
S, U = "subscribed", "unsubscribed"


@pytest.fixture(scope="module")
def server() -> Iterator[SimulatorServer]:
    config = SimulatorConfig(
        api_keys={KEY}, email_groups={"email-a", "email-b"}, sms_groups={"sms-a"}
    )
    with SimulatorServer(config) as sim:
        yield sim


@pytest.fixture
def client(server: SimulatorServer) -> Iterator[httpx.Client]:
    with control_client(server.url, KEY) as http:
        yield http


def faults(http: httpx.Client, **switches: Any) -> dict[str, Any]:
    response = http.post("/_sim/faults", json=switches)
    assert response.status_code == 200, response.text
    return response.json()


def post(http: httpx.Client, group: str, state: str, **identifiers: Any) -> httpx.Response:
    return http.post(
        V1, json={"subscription_group_id": group, "subscription_state": state, **identifiers}
    )


def set_state(http: httpx.Client, **body: Any) -> httpx.Response:
    return http.post("/_sim/set_state", json=body)


def reads(http: httpx.Client) -> dict[str, Any]:
    return http.get("/_sim/stats", params={"log": "0"}).json()["reads"]


def status_get(http: httpx.Client, group: str, kind: str, values: list[str]) -> httpx.Response:
    return http.get(GET, params=[("subscription_group_id", group), *((kind, v) for v in values)])


# --- the applied-states log (order oracle) --------------------------------------------------


def test_applied_log_records_each_state_in_arrival_order(client, server):
    assert post(client, "email-a", S, external_id=["u1", "u2"]).status_code == 201
    body = {
        "subscription_groups": [
            {"subscription_group_id": "email-a", "subscription_state": U, "external_ids": ["u1"]},
            {"subscription_group_id": "sms-a", "subscription_state": S, "external_ids": ["u2"]},
        ]
    }
    assert client.post(V2, json=body).status_code == 201
    assert post(client, "email-a", S, external_id="u1").status_code == 201
    document = client.get("/_sim/applied").json()
    assert document["complete"] is True
    by_key = {(i["group"], i["kind"], i["value"]): i["states"] for i in document["applied"]}
    u1 = by_key[("email-a", "external_id", "u1")]
    assert [(e["state"], e["source"], e["request"], e["external"]) for e in u1] == [
        (S, "v1", 0, False),
        (U, "v2", 1, False),
        (S, "v1", 2, False),
    ]
    assert u1[0]["t"] <= u1[1]["t"] <= u1[2]["t"]
    assert [e["state"] for e in by_key[("email-a", "external_id", "u2")]] == [S]
    assert [e["source"] for e in by_key[("sms-a", "external_id", "u2")]] == ["v2"]
    # The in-process view is the same log.
    in_process = server.state.applied(group="email-a", kind="external_id", value="u1")
    assert [
        (a.state, a.source, a.request) for a in in_process[("email-a", "external_id", "u1")]
    ] == [
        (S, "v1", 0),
        (U, "v2", 1),
        (S, "v1", 2),
    ]
    filtered = client.get("/_sim/applied", params={"group": "sms-a"}).json()["applied"]
    assert [item["value"] for item in filtered] == ["u2"]
    assert client.get("/_sim/applied", params={"kind": "nope"}).status_code == 400


def test_refused_and_failed_posts_apply_nothing_to_the_log(client):
    faults(client, error_rate=1.0)
    assert post(client, "email-a", S, external_id="u1").status_code == 500
    faults(client, error_rate=0.0)
    assert post(client, "email-a", "maybe", external_id="u1").status_code == 400
    assert client.get("/_sim/applied").json()["applied"] == []


def test_order_check_over_http_passes_in_order_and_names_a_stale_arrival(client, server):
    rows = [
        {"subscription_group_id": "email-a", "subscription_state": S, "email": "jane@example.com"},
        {"subscription_group_id": "email-a", "subscription_state": U, "email": "jane@example.com"},
        {"subscription_group_id": "email-a", "subscription_state": S, "external_id": "u-77"},
    ]
    enqueued = enqueued_from_rows(rows)
    for row in rows:
        kind = "email" if "email" in row else "external_id"
        assert post(client, "email-a", row["subscription_state"], **{kind: row[kind]}).is_success
    applied = applied_from_document(client.get("/_sim/applied").json())
    assert check_order(enqueued, applied) == []
    assert check_order(enqueued, applied_from_state(server.state)) == []
    # A late retry of the first change: the older state arrives after the newer one.
    assert post(client, "email-a", S, email="jane@example.com").status_code == 201
    applied = applied_from_document(client.get("/_sim/applied").json())
    (violation,) = check_order(enqueued, applied)
    assert (violation.newer, violation.arrived, violation.masked_value) == (U, S, "jan***com")
    assert "jane@example.com" not in str(violation)


def test_applied_log_limit_marks_the_log_incomplete():
    config = SimulatorConfig(api_keys={KEY}, email_groups={"g"}, applied_log_limit=2)
    with SimulatorServer(config) as sim, httpx.Client(base_url=sim.url, headers=AUTH) as http:
        assert post(http, "g", S, external_id=["a", "b"]).status_code == 201
        assert http.get("/_sim/applied").json()["complete"] is True
        assert post(http, "g", U, external_id="a").status_code == 201
        document = http.get("/_sim/applied").json()
        assert document["complete"] is False
        assert sum(len(item["states"]) for item in document["applied"]) == 2
        with pytest.raises(ValueError, match="incomplete"):
            applied_from_document(document)
        with pytest.raises(ValueError, match="incomplete"):
            applied_from_state(sim.state)
        assert http.post("/_sim/reset").status_code == 200
        assert http.get("/_sim/applied").json() == {"complete": True, "applied": []}


# --- set_state: a change made in Braze itself -----------------------------------------------


def test_set_state_changes_braze_and_is_logged_as_external(client, server):
    assert post(client, "email-a", S, email="jane@example.com").status_code == 201
    window_before = client.get("/_sim/stats", params={"log": "0"}).json()["window_requests"]
    response = set_state(client, group="email-a", kind="email", value="jane@example.com", state=U)
    assert response.status_code == 200
    assert status_get(client, "email-a", "email", ["jane@example.com"]).json()["status"] == {
        "jane@example.com": U
    }
    (item,) = client.get("/_sim/applied").json()["applied"]
    assert [(e["state"], e["source"], e["external"], e["request"]) for e in item["states"]] == [
        (S, "v1", False, 0),
        (U, "external", True, None),
    ]
    stats = client.get("/_sim/stats", params={"log": "0"}).json()
    assert stats["window_requests"] == window_before  # no write budget spent
    assert (stats["external_changes"], stats["requests_total"]) == (1, 1)
    # Many at once, in-process too.
    values = [f"user-{i}" for i in range(5)]
    assert set_state(client, group="email-b", kind="external_id", values=values, state=U).is_success
    server.state.set_state("email-b", "external_id", "user-9", S)
    answer = status_get(client, "email-b", "external_id", [*values, "user-9"]).json()["status"]
    assert answer == {**dict.fromkeys(values, U), "user-9": S}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"group": "nope", "kind": "external_id", "value": "u", "state": U}, "Unknown"),
        ({"group": "sms-a", "kind": "email", "value": "a@example.com", "state": U}, "SMS group"),
        ({"group": "email-a", "kind": "phone", "value": "+14155550100", "state": U}, "email"),
        ({"group": "email-a", "kind": "email", "value": "not-an-email", "state": U}, "Invalid"),
        ({"group": "email-a", "kind": "email_address", "value": "a@b.co", "state": U}, "kind"),
        ({"group": "email-a", "kind": "external_id", "value": "u", "state": "gone"}, "state"),
        ({"group": "email-a", "kind": "external_id", "state": U}, "one of value or values"),
        ({"group": "email-a", "kind": "external_id", "values": "u", "state": U}, "array"),
        ({"group": "email-a", "kind": "external_id", "value": "u", "state": U, "x": 1}, "x"),
    ],
)
def test_set_state_refuses_bad_bodies(client, body, message):
    response = set_state(client, **body)
    assert response.status_code == 400
    assert message in response.json()["message"]
    assert client.get("/_sim/state").json()["subscriptions"] == []


def test_set_state_checks_every_value_before_setting_any(client):
    values = ["a@example.com", "broken", "c@example.com"]
    response = set_state(client, group="email-a", kind="email", values=values, state=U)
    assert response.status_code == 400
    assert client.get("/_sim/state").json()["subscriptions"] == []


# --- write faults -----------------------------------------------------------------------------


def test_anonymous_400_names_no_identifier_and_applies_nothing(client):
    faults(client, reject_anonymous=["bad@example.com"])
    response = post(client, "email-a", S, email=["good@example.com", "bad@example.com"])
    assert response.status_code == 400
    assert "bad@example.com" not in response.text and "good@example.com" not in response.text
    assert client.get("/_sim/applied").json()["applied"] == []
    assert post(client, "email-a", S, email=["good@example.com"]).status_code == 201
    stats = client.get("/_sim/stats", params={"log": "0"}).json()
    assert (stats["rejected_400"], stats["malformed"], stats["requests_ok"]) == (1, 0, 1)


def test_named_reject_is_unchanged_beside_the_anonymous_one(client):
    faults(client, reject=["named@example.com"], reject_anonymous=["anon@example.com"])
    named = post(client, "email-a", S, email=["ok@example.com", "named@example.com"])
    assert named.json() == {"message": "Invalid email: named@example.com"}
    anonymous = post(client, "email-a", S, email=["ok@example.com", "anon@example.com"])
    assert anonymous.status_code == 400 and "anon" not in anonymous.text


def test_refused_group_is_a_400_naming_the_group_for_posts_and_reads(client):
    faults(client, reject_groups=["email-b"])
    response = post(client, "email-b", S, external_id="u1")
    assert (response.status_code, response.json()) == (
        400,
        {"message": "Unknown subscription_group_id: email-b"},
    )
    mixed = {
        "subscription_groups": [
            {"subscription_group_id": "email-a", "subscription_state": S, "external_ids": ["u1"]},
            {"subscription_group_id": "email-b", "subscription_state": S, "external_ids": ["u1"]},
        ]
    }
    assert client.post(V2, json=mixed).status_code == 400
    assert client.get("/_sim/applied").json()["applied"] == []
    read = status_get(client, "email-b", "external_id", ["u1"])
    assert (read.status_code, read.json()["message"]) == (
        400,
        "Unknown subscription_group_id: email-b",
    )
    assert post(client, "email-a", S, external_id="u1").status_code == 201


def test_soft_errors_answer_success_with_errors_and_skip_those_identifiers(client):
    faults(client, soft_errors=["b@example.com"])
    response = post(client, "email-a", S, email=["a@example.com", "b@example.com"])
    assert response.status_code == 201
    assert response.json() == {"message": "success", "errors": ["Invalid email: b@example.com"]}
    answer = status_get(client, "email-a", "email", ["a@example.com", "b@example.com"]).json()
    assert answer["status"] == {"a@example.com": S, "b@example.com": "unknown"}
    stats = client.get("/_sim/stats", params={"log": "0"}).json()
    assert (stats["requests_ok"], stats["soft_errors"]) == (1, 1)


def test_queued_answers_202_and_applies(client):
    faults(client, queued=True)
    response = post(client, "email-a", S, external_id="u1")
    assert (response.status_code, response.json()) == (202, {"message": "queued"})
    assert "x-ratelimit-remaining" in response.headers
    assert status_get(client, "email-a", "external_id", ["u1"]).json()["status"] == {"u1": S}
    assert client.get("/_sim/stats", params={"log": "0"}).json()["queued_202"] == 1


# --- GET /subscription/status/get ---------------------------------------------------------------


def test_status_get_answers_each_identifier(client):
    assert post(client, "email-a", S, external_id="bob").status_code == 201
    assert post(client, "email-a", U, email="ann@example.com").status_code == 201
    response = status_get(client, "email-a", "external_id", ["bob", "john"])
    assert response.status_code == 200
    assert response.json() == {"status": {"bob": S, "john": "unknown"}, "message": "success"}
    emails = status_get(client, "email-a", "email", ["ann@example.com"]).json()
    assert emails["status"] == {"ann@example.com": U}
    # The bracketed form of Braze's current pages, and the seed's email_address.
    brackets = client.get(
        GET, params=[("subscription_group_id", "email-a"), ("external_id[]", "bob")]
    )
    assert brackets.json()["status"] == {"bob": S}
    alias = status_get(client, "email-a", "email_address", ["ann@example.com"])
    assert alias.json()["status"] == {"ann@example.com": U}
    # Given external ids, emails are ignored (Braze documents this).
    both = client.get(
        GET,
        params={"subscription_group_id": "email-a", "external_id": "bob", "email": "x@y.co"},
    )
    assert both.json()["status"] == {"bob": S}


def test_status_get_takes_100_identifiers_and_refuses_the_101st(client):
    values = [f"user-{i}" for i in range(101)]
    assert post(client, "email-a", S, external_id=values[:50]).status_code == 201
    ok = status_get(client, "email-a", "external_id", values[:100])
    assert ok.status_code == 200
    assert list(ok.json()["status"].values()) == [S] * 50 + ["unknown"] * 50
    refused = status_get(client, "email-a", "external_id", values)
    assert refused.status_code == 400
    assert "at most 100" in refused.json()["message"]
    assert "x-ratelimit-remaining" in refused.headers


@pytest.mark.parametrize(
    ("params", "status", "message"),
    [
        ([("external_id", "u")], 400, "Missing subscription_group_id"),
        ([("subscription_group_id", "nope"), ("external_id", "u")], 400, "Unknown"),
        ([("subscription_group_id", "email-a")], 400, "One of external_id"),
        (
            [("subscription_group_id", "email-a"), ("email", "a@b.co"), ("phone", "+14155550100")],
            400,
            "not both",
        ),
        ([("subscription_group_id", "sms-a"), ("email", "a@b.co")], 400, "SMS group"),
        ([("subscription_group_id", "email-a"), ("phone", "+14155550100")], 400, "email group"),
        ([("subscription_group_id", "email-a"), ("external_id", "")], 400, "must not be empty"),
    ],
)
def test_status_get_refuses_bad_queries(client, params, status, message):
    response = client.get(GET, params=params)
    assert response.status_code == status
    assert message in response.json()["message"]


def test_reads_need_the_bearer_key(client, server):
    for path in (GET, USER):
        response = httpx.get(
            f"{server.url}{path}",
            params={"subscription_group_id": "email-a", "external_id": "u"},
            headers={"Authorization": "Bearer wrong"},
        )
        assert response.status_code == 401
        assert "x-ratelimit-limit" in response.headers
    counted = reads(client)
    assert (counted["unauthorized"], counted["window_requests"]) == (2, 0)


def test_legacy_answer_form(client):
    assert post(client, "email-a", S, external_id="a").status_code == 201
    assert post(client, "email-a", U, external_id="b").status_code == 201
    faults(client, legacy_reads=True)
    answer = status_get(client, "email-a", "external_id", ["a", "b", "c"]).json()
    assert answer["status"] == {"a": 0, "b": 1, "c": None}
    config = SimulatorConfig(api_keys={KEY}, email_groups={"g"}, legacy_read_values=True)
    with SimulatorServer(config) as sim, httpx.Client(base_url=sim.url, headers=AUTH) as http:
        assert status_get(http, "g", "external_id", ["x"]).json()["status"] == {"x": None}


# --- GET /subscription/user/status ------------------------------------------------------------


def test_user_status_lists_the_groups_of_an_identifier(client):
    assert post(client, "email-b", U, external_id="bob").status_code == 201
    assert post(client, "email-a", S, external_id="bob").status_code == 201
    assert post(client, "sms-a", S, external_id="bob").status_code == 201
    response = client.get(USER, params={"external_id": "bob"})
    assert response.status_code == 200
    assert response.json() == {
        "users": [
            {
                "external_id": "bob",
                "subscription_groups": [
                    {
                        "id": "email-a",
                        "name": "email-a",
                        "channel": "email",
                        "status": "Subscribed",
                    },
                    {
                        "id": "email-b",
                        "name": "email-b",
                        "channel": "email",
                        "status": "Unsubscribed",
                    },
                    {"id": "sms-a", "name": "sms-a", "channel": "sms", "status": "Subscribed"},
                ],
            }
        ],
        "total_count": 1,
        "message": "success",
    }
    assert int(response.headers["x-ratelimit-limit"]) == 250_000
    nobody = client.get(USER, params={"email": "nobody@example.com"}).json()
    assert (nobody["users"], nobody["total_count"]) == ([], 0)


def test_user_status_pages_with_limit_and_offset(client):
    users = [f"user-{i:02}" for i in range(7)]
    assert post(client, "email-a", S, external_id=users).status_code == 201
    seen: list[str] = []
    offset = 0
    while True:
        page = client.get(
            USER, params=[*(("external_id[]", u) for u in users), ("limit", 3), ("offset", offset)]
        ).json()
        assert page["total_count"] == 7
        seen += [user["external_id"] for user in page["users"]]
        offset += 3
        if offset >= page["total_count"]:
            break
    assert seen == users
    default = client.get(USER, params=[("external_id", u) for u in users]).json()
    assert len(default["users"]) == 7


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ([("external_id", "u"), ("limit", "0")], "limit must be between 1 and 100"),
        ([("external_id", "u"), ("limit", "101")], "limit must be between 1 and 100"),
        ([("external_id", "u"), ("limit", "x")], "limit must be an integer"),
        ([("external_id", "u"), ("offset", "-1")], "offset must be at least 0"),
        ([], "One of external_id"),
        ([("external_id", f"u{i}") for i in range(51)], "at most 50"),
    ],
)
def test_user_status_refuses_bad_queries(client, params, message):
    response = client.get(USER, params=params)
    assert response.status_code == 400
    assert message in response.json()["message"]


# --- the read budget --------------------------------------------------------------------------


def test_read_budget_defaults_to_250000_per_hour(client):
    response = status_get(client, "email-a", "external_id", ["u"])
    now = time.time()
    assert int(response.headers["x-ratelimit-limit"]) == 250_000
    assert int(response.headers["x-ratelimit-remaining"]) == 249_999
    assert int(response.headers["x-ratelimit-reset"]) == math.ceil(
        (math.floor(now / 3600) + 1) * 3600
    )
    counted = reads(client)
    assert (counted["rate_limit"], counted["window_seconds"]) == (250_000, 3600)
    defaults = SimulatorConfig()
    assert (defaults.read_rate_limit, defaults.read_window_seconds) == (250_000, 3600)
    assert (defaults.read_max_identifiers, defaults.applied_log_limit) == (100, 1_000_000)


def test_read_budget_is_separate_from_the_write_budget(client):
    faults(client, read_rate_limit=3, read_window_seconds=3600, rate_limit=2)
    for remaining in (2, 1, 0):
        response = status_get(client, "email-a", "external_id", ["u"])
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit"] == "3"
        assert response.headers["x-ratelimit-remaining"] == str(remaining)
    over = client.get(USER, params={"external_id": "u"})
    assert over.status_code == 429
    assert over.headers["x-ratelimit-remaining"] == "0"
    # The write budget is untouched by reads, and spending it does not touch reads.
    first = post(client, "email-a", S, external_id="u")
    assert (first.status_code, first.headers["x-ratelimit-limit"]) == (201, "2")
    assert first.headers["x-ratelimit-remaining"] == "1"
    assert post(client, "email-a", S, external_id="u").status_code == 201
    assert post(client, "email-a", S, external_id="u").status_code == 429
    counted = reads(client)
    assert (counted["requests_ok"], counted["rate_limited_429"]) == (3, 1)
    assert (counted["window_requests"], counted["max_requests_in_window"]) == (3, 3)
    faults(client, read_rate_limit=4)
    assert status_get(client, "email-a", "external_id", ["u"]).status_code == 200


def test_read_429_lifts_when_the_read_window_resets(client):
    faults(client, read_rate_limit=1, read_window_seconds=2)
    assert status_get(client, "email-a", "external_id", ["u"]).status_code == 200
    refused = status_get(client, "email-a", "external_id", ["u"])
    reset = int(refused.headers["x-ratelimit-reset"])
    if refused.status_code == 200:  # the window rolled between the two calls: once more
        refused = status_get(client, "email-a", "external_id", ["u"])
        reset = int(refused.headers["x-ratelimit-reset"])
    assert refused.status_code == 429
    time.sleep(max(0.0, reset - time.time()) + 0.05)  # time itself is what is awaited here
    again = status_get(client, "email-a", "external_id", ["u"])
    assert again.status_code == 200
    assert int(again.headers["x-ratelimit-reset"]) > reset


def test_read_spend_uses_the_read_window_like_another_client(client):
    state = faults(client, read_rate_limit=5, read_window_seconds=3600, read_spend=4)
    assert (state["read_rate_limit"], state["read_window_seconds"]) == (5, 3600)
    assert (
        status_get(client, "email-a", "external_id", ["u"]).headers["x-ratelimit-remaining"] == "0"
    )
    assert status_get(client, "email-a", "external_id", ["u"]).status_code == 429
    assert post(client, "email-a", S, external_id="u").status_code == 201


def test_outage_takes_reads_down_too(client):
    faults(client, outage=True)
    assert status_get(client, "email-a", "external_id", ["u"]).status_code == 503
    assert client.get(USER, params={"external_id": "u"}).status_code == 503
    counted = reads(client)
    assert (counted["server_errors"], counted["window_requests"]) == (2, 0)


def test_read_log_in_stats(client):
    status_get(client, "email-a", "external_id", ["a", "b"])
    client.get(USER, params={"external_id": "a"})
    stats = client.get("/_sim/stats").json()
    assert [(r["endpoint"], r["identifiers"], r["status"]) for r in stats["reads"]["requests"]] == [
        ("status_get", 2, 200),
        ("user_status", 1, 200),
    ]
    assert stats["requests"] == []  # reads are not in the write log


# --- `braze-subs simulate` options ------------------------------------------------------------


def test_simulate_command_takes_the_read_options():
    port = free_port()
    command = [sys.executable, "-m", "worker", "simulate", "--port", str(port)]
    options = ["--read-rate-limit", "7", "--legacy-read-values", "--applied-log-limit", "0"]
    process = subprocess.Popen(
        [*command, *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/_sim/health").status_code == 200
        except httpx.TransportError:
            assert process.poll() is None, "braze-subs simulate exited"
            return False

    try:
        wait_until(healthy, timeout=30, what="braze-subs simulate")
        with httpx.Client(base_url=url, headers=AUTH) as http:
            response = status_get(http, "any-group", "external_id", ["u"])
            assert response.headers["x-ratelimit-limit"] == "7"
            assert response.json()["status"] == {"u": None}
            assert post(http, "any-group", S, external_id="u").status_code == 201
            assert http.get("/_sim/applied").json() == {"complete": False, "applied": []}
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_simulate_command_refuses_a_bad_option_in_one_line():
    command = [sys.executable, "-m", "worker", "simulate", "--read-window-seconds", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == "braze-subs: simulate: read_window_seconds must be positive"
