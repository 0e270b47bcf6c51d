import re

import pytest

from diloco.guardrails import (
    GuardrailError,
    check_output,
    compile_patterns,
    filter_documents,
    pattern_problem,
)

DATA = {"id": 1, "title": "No secrets", "kind": "data_filter", "patterns": [r"password\s*=", "SECRET"],
        "description": "drop credentials"}
OUTPUT = {"id": 2, "title": "No slurs", "kind": "output_filter", "patterns": ["badword"], "description": ""}
OUTPUT2 = {"id": 3, "title": "No eval", "kind": "output_filter", "patterns": [r"eval\("], "description": ""}


def test_filter_documents_drops_matches_case_insensitively():
    docs = ["hello", "PASSWORD = hunter2", "a secret here", "fine text"]
    kept, dropped = filter_documents(docs, [DATA, OUTPUT])
    assert kept == ["hello", "fine text"]
    assert dropped == 2


def test_filter_documents_ignores_output_filters_and_retired():
    docs = ["badword", "password=1"]
    assert filter_documents(docs, [OUTPUT]) == (docs, 0)
    assert filter_documents(docs, [{**DATA, "active": False}]) == (docs, 0)
    assert filter_documents(docs, []) == (docs, 0)


def test_check_output_returns_first_matching_output_filter():
    guards = [DATA, OUTPUT, OUTPUT2]
    assert check_output("nothing wrong", guards) is None
    assert check_output("this has BadWord in it", guards) == OUTPUT
    assert check_output("eval(x) and badword", [OUTPUT2, OUTPUT]) == OUTPUT2
    assert check_output("password = 3", guards) is None  # data filters do not apply to outputs


def test_bad_pattern_raises_guardrail_error_naming_the_guardrail():
    with pytest.raises(GuardrailError, match=r"guardrail #1 \(No secrets\) cannot be enforced: pattern 1"):
        filter_documents(["x"], [{**DATA, "patterns": ["("]}])


def test_patterns_compile_to_an_re2_program():
    program = compile_patterns((r"password\s*=", "(a+)+$"))
    assert type(program).__module__.startswith("re2")
    assert not isinstance(program, re.Pattern)


@pytest.mark.parametrize("text", ["a" * 30 + "!", "a" * 100_000 + "!", ("ab" * 50_000) + "\x00"])
def test_catastrophic_pattern_runs_in_linear_time(text):
    # On Python's backtracking engine the first text alone takes 2**30 steps; RE2 scans each once.
    evil = {"id": 9, "title": "Evil", "kind": "data_filter", "patterns": ["(a+)+$", "(a|aa)*c", "(x+x+)+y"]}
    kept, dropped = filter_documents([text, "fine"], [evil])
    assert (kept, dropped) == ([text, "fine"], 0)
    out = {**evil, "kind": "output_filter"}
    assert check_output(text, [out]) is None
    assert check_output("aaaa", [out]) == out


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        ([r"(a)\1"], "invalid escape sequence"),  # backreference
        (["foo(?=bar)"], "invalid perl operator"),  # lookahead
        (["(?<!x)y"], "invalid perl operator"),  # lookbehind
        ([r"\pL{1000}"], "pattern too large"),  # over max_mem
        (["x" * 201], "At most 200 characters"),
        ([f"p{i}" for i in range(51)], "at most 50 patterns"),
        ([""], "Empty pattern"),
        ([3], "must be a string"),
    ],
)
def test_patterns_re2_refuses_are_never_run_another_way(patterns, message):
    stored = {"id": 4, "title": "Legacy", "kind": "output_filter", "patterns": patterns}
    with pytest.raises(GuardrailError, match=message) as info:
        check_output("anything", [OUTPUT, stored])
    assert info.value.guardrail is stored
    with pytest.raises(GuardrailError, match="guardrail #4"):
        filter_documents(["doc"], [{**stored, "kind": "data_filter"}])


def test_pattern_problem_says_why():
    assert pattern_problem("plain words") is None
    assert pattern_problem(r"\bword\b") is None
    assert "RE2" in pattern_problem("(?=x)")
    assert "Empty" in pattern_problem("")


def test_case_insensitive_beyond_ascii():
    guard = {**OUTPUT, "patterns": ["straße", "ÉCOLE"]}
    assert check_output("STRASSE", [guard]) is None  # simple case folding only, like Python's re
    assert check_output("STRAẞE", [guard]) == guard
    assert check_output("une école", [guard]) == guard
