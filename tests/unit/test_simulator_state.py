"""The simulator's state in-process (issue 26: its bookkeeping is kept per list of a post,
the subscriptions and the applied log in tuples): what a reader sees is what it was."""

from __future__ import annotations

from simulator import SimulatorConfig, SimulatorState
from simulator.model import UpdateList, ValidatedRequest
from simulator.state import Outcome, RequestRecord
from simulator.validation import GroupRules, validate_v1

RULES = GroupRules(groups={}, auto_groups=True)


def post(state: SimulatorState, body: dict[str, object], t: float, **kwargs: object) -> None:
    """Apply a v1 body as a successful post at time `t`."""
    request = validate_v1(body, state.validation_rules())
    assert isinstance(request, ValidatedRequest), request
    record = RequestRecord(t, "v1", request.identifiers, request.entries, 201)
    state.finish(record, Outcome.OK, request, **kwargs)  # type: ignore[arg-type]


def test_a_key_applied_often_keeps_every_state_in_order() -> None:
    """Sixty states of one identifier, posts and changes made in Braze in turn, come back
    in the order applied, each with its time, source and request."""
    state = SimulatorState(SimulatorConfig(auto_groups=True), clock=lambda: 1000.0)
    expected = []
    for n in range(60):
        value = ("subscribed", "unsubscribed")[n % 2]
        if n % 3 == 2:
            state.set_state("news", "email", "a@example.com", value)  # type: ignore[arg-type]
            expected.append((1000.0, value, "external", None))
        else:
            body = {"subscription_group_id": "news", "subscription_state": value}
            post(state, {**body, "email": ["a@example.com", "b@example.com"]}, float(n))
            expected.append((float(n), value, "v1", len(state.requests()) - 1))
    applied = state.applied()
    seen = [
        (a.t, a.state, a.source, a.request) for a in applied[("news", "email", "a@example.com")]
    ]
    assert seen == expected
    assert len(applied[("news", "email", "b@example.com")]) == 40
    document = state.applied_document(value="a@example.com")
    assert [s["state"] for s in document["applied"][0]["states"]] == [e[1] for e in expected]
    assert state.subscriptions()[0] == {
        "group": "news",
        "kind": "email",
        "value": "a@example.com",
        "state": expected[-1][1],
        "double_opt_in": False,
        "updates": 60,
    }


def test_the_applied_log_stops_at_its_limit_and_says_so() -> None:
    state = SimulatorState(SimulatorConfig(auto_groups=True, applied_log_limit=70))
    body = {"subscription_group_id": "ext", "subscription_state": "subscribed"}
    post(state, {**body, "external_id": [f"u{n}" for n in range(50)]}, 1.0)
    assert state.applied_complete()
    post(state, {**body, "external_id": [f"u{n}" for n in range(25, 75)]}, 2.0)
    assert not state.applied_complete()
    applied = state.applied()
    assert sum(len(states) for states in applied.values()) == 70
    assert [a.t for a in applied[("ext", "external_id", "u30")]] == [1.0, 2.0]
    assert [a.t for a in applied[("ext", "external_id", "u44")]] == [1.0, 2.0]
    assert [a.t for a in applied[("ext", "external_id", "u45")]] == [1.0]  # past the limit
    assert ("ext", "external_id", "u60") not in applied
    assert state.status("ext", "external_id", "u60") == "subscribed"  # applied all the same


def test_skipped_identifiers_are_neither_applied_nor_logged() -> None:
    state = SimulatorState(SimulatorConfig(auto_groups=True))
    body = {"subscription_group_id": "news", "subscription_state": "subscribed"}
    post(
        state,
        {**body, "email": ["a@example.com", "b@example.com"]},
        1.0,
        skipped=frozenset({("email", "b@example.com")}),
    )
    assert state.status("news", "email", "a@example.com") == "subscribed"
    assert state.status("news", "email", "b@example.com") is None
    assert list(state.applied()) == [("news", "email", "a@example.com")]
    assert state.stats(include_log=False)["soft_errors"] == 1


def test_an_identifiers_groups_are_listed_by_id_and_forgotten_at_reset() -> None:
    state = SimulatorState(SimulatorConfig(auto_groups=True))
    for group, value in (("zeta", "subscribed"), ("alpha", "unsubscribed"), ("news", "subscribed")):
        post(state, {"subscription_group_id": group, "subscription_state": value,
                     "email": "a@example.com"}, 1.0)  # fmt: skip
    post(state, {"subscription_group_id": "other", "subscription_state": "subscribed",
                 "email": "b@example.com"}, 1.0)  # fmt: skip
    assert state.user_groups("email", "a@example.com") == [
        ("alpha", "email", "unsubscribed"),
        ("news", "email", "subscribed"),
        ("zeta", "email", "subscribed"),
    ]
    assert state.user_groups("external_id", "a@example.com") == []
    assert state.lookup("news", [("email", "a@example.com"), ("email", "c@example.com")]) == {
        "a@example.com": "subscribed",
        "c@example.com": "unknown",
    }
    state.reset()
    assert state.user_groups("email", "a@example.com") == []
    assert state.applied() == {}
    assert state.subscriptions() == []


def test_a_request_lists_its_updates_once_each_in_the_order_posted() -> None:
    request = validate_v1(
        {
            "subscription_group_id": "ext",
            "subscription_state": "unsubscribed",
            "external_id": ["b", "a", "b", "c"],
        },
        RULES,
    )
    assert isinstance(request, ValidatedRequest)
    assert request.lists == (
        UpdateList("ext", "unsubscribed", "external_id", ("b", "a", "c"), False),
    )
    assert [u.value for u in request.updates] == ["b", "a", "c"]
    assert request.identifiers == 3
