"""``diloco.safejson``: the one loader for JSON from strangers (request bodies, metrics, update headers)."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diloco import safejson

text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"))  # storable strings
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                      max_leaves=30)


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


@given(values)
def test_storable_json_within_the_limit_reads_as_json_does(value):
    raw = json.dumps(value)
    if _depth(value) <= safejson.MAX_DEPTH:
        assert safejson.loads(raw) == json.loads(raw)


@pytest.mark.parametrize("depth", [33, 100, 1_000, 200_000])
def test_nesting_beyond_the_limit_is_refused_never_a_recursion_error(depth):
    for opener, closer in (("[", "]"), ('{"a":', "}")):
        with pytest.raises(safejson.JsonRefused, match="nested deeper than 32 levels"):
            safejson.loads(opener * depth + "1" + closer * depth)


def test_the_limit_is_exact():
    assert safejson.loads("[" * 32 + "]" * 32, max_depth=32)
    with pytest.raises(safejson.JsonRefused):
        safejson.loads("[" * 33 + "]" * 33, max_depth=32)


@pytest.mark.parametrize("text, field", [
    ('{"a": {"b": [1, NaN]}}', "a.b[1]"),
    ('{"loss": 1e400}', "loss"),
    ('{"loss": -Infinity}', "loss"),
    ('{"name": "a\\u0000b"}', "name"),
    ('{"name": "\\udc00"}', "name"),
    ('{"spec": {"x\\u0000": 1}}', "spec"),
    ('["ok", "\\u0000"]', "body[1]"),
])
def test_unstorable_values_are_refused_by_path(text, field):
    with pytest.raises(safejson.JsonRefused) as caught:
        safejson.loads(text)
    assert caught.value.field == field


def test_what_names_the_value_itself():
    with pytest.raises(safejson.JsonRefused) as caught:
        safejson.loads('{"loss_end": 1e999}', what="metrics")
    assert caught.value.field == "metrics.loss_end"


def test_text_that_is_not_json_is_a_value_error():
    for text in ("{", "nope", b"\xff\xfe"):
        with pytest.raises(ValueError):
            safejson.loads(text)
