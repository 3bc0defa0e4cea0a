"""The worker's JSON message decoder (tasks/message_json.py): kombu's, except that an
integer past Python's int/str limit is left as its digits instead of failing the message."""

from __future__ import annotations

from kombu.utils.json import dumps

from tasks.message_json import loads


def test_long_integers_stay_digits_and_the_rest_decodes_as_kombu_does() -> None:
    huge = "9" * 5000
    body = b'[[], {"occurred_at": ' + huge.encode() + b', "n": -12, "x": 1.5}, {}]'
    assert loads(body) == [[], {"occurred_at": huge, "n": -12, "x": 1.5}, {}]
    assert loads(memoryview(body))[1]["occurred_at"] == huge
    assert loads('{"n": ' + "9" * 4300 + "}")["n"] == int("9" * 4300)
    assert loads(dumps({"a": [1, "b"]})) == {"a": [1, "b"]}
