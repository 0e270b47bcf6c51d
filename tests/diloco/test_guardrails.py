import pytest

from diloco.guardrails import check_output, filter_documents

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


def test_bad_pattern_raises_value_error():
    with pytest.raises(ValueError, match="does not compile"):
        filter_documents(["x"], [{**DATA, "patterns": ["("]}])
