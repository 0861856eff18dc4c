"""The Lists' `filter` (AIP-160, the part users need): conditions joined by
AND, bare or quoted values, enum values by name, clear refusals."""
from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.common.filters import enum_word, merged, parse_filter, text

FIELDS = {"label": text, "workflow_id": text,
          "state": enum_word({"PROVISIONED": "provisioned", "DESTROYED": "destroyed"}, "RESOURCE_STATE_")}


def violation(call) -> str:
    with pytest.raises(InvalidArgument) as info:
        call()
    [v] = info.value.violations
    assert v.field == "filter"
    return v.description


def test_conditions_joined_by_and_with_bare_or_quoted_values():
    assert parse_filter('state = PROVISIONED AND label = "team \\"a\\" b"', FIELDS) == \
        {"state": "provisioned", "label": 'team "a" b'}
    assert parse_filter("state=resource_state_destroyed AND workflow_id=w-1:2/3", FIELDS) == \
        {"state": "destroyed", "workflow_id": "w-1:2/3"}
    assert parse_filter("", FIELDS) == {} and parse_filter("   ", FIELDS) == {}


def test_what_a_list_does_not_understand_is_refused_without_echoing_it():
    assert "cannot filter on 'name'" in violation(lambda: parse_filter('name = "x"', FIELDS))
    assert "one of DESTROYED, PROVISIONED" in violation(lambda: parse_filter("state = GONE", FIELDS))
    assert "joined by AND" in violation(lambda: parse_filter("label = a OR label = b", FIELDS))
    assert "expected <field> = <value>" in violation(lambda: parse_filter("label != a", FIELDS))
    assert "twice" in violation(lambda: parse_filter("label = a AND label = b", FIELDS))
    huge = "label = " + "x" * 5000
    assert "at most 1024" in violation(lambda: parse_filter(huge, FIELDS))
    assert "x" * 50 not in violation(lambda: parse_filter("label = x AND " + "x" * 200 + " = 1", FIELDS))


def test_typed_fields_and_the_filter_agree_or_are_refused():
    assert merged({"label": "", "state": "provisioned"}, {"label": "a"}) == {"label": "a", "state": "provisioned"}
    assert merged({"state": "provisioned"}, {"state": "provisioned"}) == {"state": "provisioned"}
    assert "differs" in violation(lambda: merged({"state": "provisioned"}, {"state": "destroyed"}))
