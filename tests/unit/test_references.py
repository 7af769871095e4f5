"""References between workflow steps (emp_tasks.core.references): the rules alone."""

from __future__ import annotations

import pytest

from emp_tasks.core import references
from emp_tasks.core.references import MalformedReference, ReferenceNotFound

RESULTS = {0: {"outputs": [{"url": "https://x/0.png", "size_bytes": 10}], "seed": 7, "ok": True}}


def test_a_whole_string_reference_takes_the_value_with_its_type():
    payload = {"a": "{{ steps.0.seed }}", "b": "{{steps.0.outputs}}", "c": "{{ steps.0.ok }}"}
    assert references.resolve(payload, RESULTS) == {
        "a": 7,
        "b": RESULTS[0]["outputs"],
        "c": True,
    }


def test_references_inside_text_are_interpolated_as_text():
    text = "img {{ steps.0.outputs.0.url }} seed={{ steps.0.seed }} {{ steps.0.outputs.0 }}"
    assert references.resolve([text], RESULTS) == [
        'img https://x/0.png seed=7 {"url":"https://x/0.png","size_bytes":10}'
    ]


def test_nested_payloads_and_plain_strings_are_left_as_they_are():
    payload = {"list": [{"deep": ["{{ steps.0.seed }}", "{{ not a ref }}", 3]}], "n": None}
    assert references.resolve(payload, RESULTS) == {
        "list": [{"deep": [7, "{{ not a ref }}", 3]}],
        "n": None,
    }


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{{ steps.0.outputs.1.url }}", "no index '1'"),
        ("{{ steps.0.missing }}", "no key 'missing'"),
        ("{{ steps.0.seed.x }}", "is a number"),
        ("{{ steps.0.outputs.first }}", "no index 'first'"),
        ("{{ steps.1.url }}", "step 1 has no result"),
    ],
)
def test_a_path_the_result_lacks_is_not_found(text, reason):
    with pytest.raises(ReferenceNotFound) as raised:
        references.resolve({"x": text}, RESULTS)
    assert reason in str(raised.value)


def test_find_names_each_reference_and_where_it_sits():
    found = references.find({"a": [{"b": "x {{ steps.2.outputs.0.url }} {{ steps.0.seed }}"}]})
    assert [(r.step_index, r.path, r.where) for r in found] == [
        (2, ("outputs", "0", "url"), ("a", 0, "b")),
        (0, ("seed",), ("a", 0, "b")),
    ]
    assert references.has_any({"a": ["{{ steps.1 }}"]})
    assert not references.has_any({"a": ["{{ nothing }}", 1]})


@pytest.mark.parametrize("text", ["{{ steps.x.url }}", "{{ steps }}", "{{ steps.0..a }}"])
def test_text_written_like_a_reference_that_is_not_one_is_malformed(text):
    with pytest.raises(MalformedReference):
        references.find({"k": [text]})
