"""``gateway status``'s reading of the listing: state, cause and the table (cli.py)."""

from __future__ import annotations

import pytest

from gateway_app.cli import (
    _printable,
    _remaining,
    _table,
    build_parser,
    instance_cause,
    instance_state,
)


@pytest.mark.parametrize("inst, state", [
    ({"health": "healthy", "ejected_until": None}, "healthy"),
    ({"health": "unhealthy", "ejected_until": "2030-01-01T00:00:00Z"}, "ejected"),
    ({"health": "draining", "ejected_until": "2030-01-01T00:00:00Z"}, "draining"),
    ({"health": "unknown"}, "unknown"),
    ({}, "unknown"),
    # the health API's own state wins
    ({"state": "ejected", "health": "unhealthy", "ejected_until": None}, "ejected"),
])
def test_state(inst, state):
    assert instance_state(inst) == state


def test_cause_prefers_the_gateways_own_then_events_then_probe_then_the_rule():
    ejected = {"health": "unhealthy", "ejected_until": "2030-01-01T00:00:00Z"}
    assert instance_cause(ejected, None) == "ejected after 5 failures in a row"
    probe = {**ejected, "last_check": {"ok": False, "status": 500, "time": "x"}}
    assert instance_cause(probe, None) == "probe: HTTP 500"
    timeline = [{"cause": "probe passed"}, {"cause": "5 consecutive failures: refused"}]
    assert instance_cause(probe, timeline) == "5 consecutive failures: refused"
    assert instance_cause({**probe, "last_cause": "lease lapsed"}, timeline) == "lease lapsed"
    assert instance_cause({**probe, "last_cause": {"cause": "drained", "time": 1}},
                          None) == "drained"
    assert instance_cause({"health": "healthy", "consecutive_failures": 2}, None) \
        == "2 failures in a row"
    assert instance_cause({"health": "healthy", "consecutive_failures": 0}, None) == ""


def test_the_table_lines_up_and_prints_nothing_that_moves_the_cursor():
    table = _table(["A", "LONGER", "LAST"], [["xxxx", "y", "the end"], ["z", "w", ""]])
    assert table.splitlines() == ["A      LONGER   LAST", "xxxx   y        the end", "z      w"]
    assert _printable("red\x1b[31m\nline") == "red?[31m?line"
    assert _printable("x" * 300, 10) == "x" * 9 + "…"
    assert _remaining(None, 0) == "-"
    assert _remaining("1970-01-01T00:01:30Z", 0) == "1m30s"
    assert _remaining("1970-01-01T00:00:00Z", 10) == "0s"


def test_events_is_bounded():
    parser = build_parser()
    assert parser.parse_args(["status", "--events", "0"]).events == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["status", "--events", "51"])
