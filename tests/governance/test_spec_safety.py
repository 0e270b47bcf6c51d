"""Specs refuse what the server or an agent must never run: patterns off RE2, dataset sources off the public
internet or outside the data root. Each is refused at proposal time with the field named and nothing stored."""

import pytest

from diloco import guardrails as diloco_guardrails
from diloco.data import address_is_public as fetch_address_is_public
from governance import specs
from governance.models import Proposal
from governance.specs import spec_normalise
from ledger.models import Entry

pytestmark = pytest.mark.django_db
URL = "/api/v1/proposals/"
SHA = "a" * 64


def _refused(client, kind, spec, field):
    response = client.post(URL, {"kind": kind, "title": "Should not stick", "spec": spec}, format="json")
    assert response.status_code == 400, response.json()
    body = response.json()
    assert field in body["fields"], body
    assert not Proposal.objects.exists() and not Entry.objects.exists()
    return body["fields"][field]


# --- patterns ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "field", "message"),
    [
        (["ok", "fine", r"(a)\1"], "spec.patterns.2", "RE2"),  # backreference
        (["foo(?=bar)"], "spec.patterns.0", "RE2"),  # lookahead
        (["ok", "(?<!x)y"], "spec.patterns.1", "RE2"),  # lookbehind
        ([r"\pL{1000}"], "spec.patterns.0", "too large"),  # over RE2's memory bound
        ([r"[\pL\pN]{380}", r"[\pL\pS]{380}"], "spec.patterns", "together"),  # each fits, both do not
    ],
)
def test_a_pattern_re2_cannot_compile_is_refused(member_client, patterns, field, message):
    errors = _refused(member_client, "guardrail", {"kind": "output_filter", "patterns": patterns}, field)
    assert any(message in e for e in errors), errors


def test_a_catastrophic_but_regular_pattern_is_accepted_and_runs_on_re2(member_client):
    response = member_client.post(URL, {"kind": "guardrail", "title": "Evil but regular", "spec": {
        "kind": "data_filter", "patterns": ["(a+)+$"]}}, format="json")
    assert response.status_code == 201, response.json()
    program = diloco_guardrails.compile_patterns(tuple(response.json()["spec"]["patterns"]))
    assert type(program).__module__.startswith("re2")


@pytest.mark.parametrize("pattern", [
    "plain", r"\bword\b", "(a+)+$", r"(a)\1", "x(?=y)", "(?<=x)y", r"\pL{1000}", "[[:alpha:]]+", r"\p{Greek}",
    "(?P<name>x)", "(?i)MiXeD", "a{1001}", "a++", "(?>a)", r"\Z", r"\z", "[a-", "*",
])
def test_the_proposal_check_and_the_filters_agree(pattern):
    """governance.specs may not import diloco; the two copies of the RE2 rules must give the same verdict."""
    try:
        spec_normalise(kind="guardrail", spec={"kind": "data_filter", "patterns": [pattern]})
        accepted = True
    except Exception:  # noqa: BLE001 (a ValidationError)
        accepted = False
    assert accepted == (diloco_guardrails.pattern_problem(pattern) is None), pattern
    assert specs.MAX_PATTERNS == diloco_guardrails.MAX_PATTERNS
    assert specs.MAX_PATTERN_LENGTH == diloco_guardrails.MAX_PATTERN_LENGTH
    assert specs.RE2_MAX_MEM == diloco_guardrails.MAX_PROGRAM_BYTES


# --- dataset sources --------------------------------------------------------------------------------


@pytest.fixture
def data_root(settings, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "corpus.txt").write_text("one\n\ntwo\n")
    settings.AGORA_DATA_ROOT = root
    settings.AGORA_MAX_DATASET_BYTES = 1000
    return root


def _dataset(source, **extra):
    return {"dataset": {"source": source, **extra}}


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("file:/etc/shadow", "under the server's data root"),
        ("file:/proc/self/environ", "under the server's data root"),
        ("file:/dev/zero", "under the server's data root"),
        ("file:{root}/../outside.txt", "under the server's data root"),
        ("file:{root}/link-out", "under the server's data root"),
        ("file:{root}/zero", "under the server's data root"),
        ("file:{root}", "under the server's data root"),
        ("file:{root}/missing.txt", "There is no file"),
        ("file:{root}/folder", "regular file"),
        ("file:{root}/fifo", "regular file"),
        ("file:{root}/big.txt", "the limit is 1000"),
        ("file:relative.txt", "absolute path"),
    ],
)
def test_file_sources_outside_the_data_root_are_refused(member_client, data_root, source, message):
    import os

    (data_root.parent / "outside.txt").write_text("secret")
    (data_root / "link-out").symlink_to(data_root.parent / "outside.txt")
    (data_root / "zero").symlink_to("/dev/zero")
    (data_root / "folder").mkdir()
    os.mkfifo(data_root / "fifo")
    (data_root / "big.txt").write_bytes(b"x" * 1001)
    errors = _refused(member_client, "training", _dataset(source.format(root=data_root)), "spec.dataset.source")
    assert any(message in e for e in errors), errors


def test_a_file_under_the_data_root_is_accepted(member_client, data_root):
    (data_root / "sub").mkdir()
    (data_root / "sub" / "link.txt").symlink_to(data_root / "corpus.txt")
    for source in [f"file:{data_root}/corpus.txt", f"file:{data_root}/sub/../sub/link.txt"]:
        response = member_client.post(URL, {"kind": "training", "title": "Local corpus",
                                            "spec": _dataset(source)}, format="json")
        assert response.status_code == 201, response.json()
    assert Proposal.objects.count() == 2


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("https://127.0.0.1:6379/x", "not a public address"),
        ("https://[::1]/x", "not a public address"),
        ("https://10.0.0.1/", "not a public address"),
        ("https://169.254.169.254/latest/meta-data/", "not a public address"),
        ("https://[::ffff:127.0.0.1]/x", "not a public address"),
        ("https://[fe80::1]/x", "not a public address"),
        ("https://224.0.0.1/x", "not a public address"),
        ("https://0.0.0.0/x", "not a public address"),
        ("https://192.168.1.1/x", "not a public address"),
        ("https://localhost/x", "not a public host name"),
        ("https://metadata.google.internal/x", "not a public host name"),
        ("https://printer.local/x", "not a public host name"),
        ("https://user:secret@data.example.org/x", "No user name or password"),
        ("http://data.example.org/x", "http and other schemes are refused"),
        ("ftp://data.example.org/x", "http and other schemes are refused"),
        ("gopher://data.example.org/x", "http and other schemes are refused"),
        ("https://data.example.org:99999/x", "Not a valid https URL"),
    ],
)
def test_https_sources_that_are_not_public_are_refused(member_client, source, message):
    errors = _refused(member_client, "training", _dataset(source, sha256=SHA), "spec.dataset.source")
    assert any(message in e for e in errors), errors


def test_legacy_numeric_hosts_are_read_as_the_resolver_would(member_client):
    # 2130706433 and 0x7f.1 are 127.0.0.1 to getaddrinfo; URLValidator may or may not let them through.
    for source in ["https://2130706433/x", "https://0x7f.1/x", "https://017700000001/x"]:
        _refused(member_client, "training", _dataset(source, sha256=SHA), "spec.dataset.source")


def test_a_public_https_source_is_accepted_without_a_network_lookup(member_client, monkeypatch):
    import socket

    def no_dns(*args, **kwargs):
        raise AssertionError("the proposal check must not resolve host names")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(socket, "gethostbyname", no_dns)
    for source in ["https://data.example.org/corpus.txt", "https://93.184.215.14/c.txt",
                   "https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/c.txt"]:
        response = member_client.post(URL, {"kind": "training", "title": "Public corpus",
                                            "spec": _dataset(source, sha256=SHA)}, format="json")
        assert response.status_code == 201, (source, response.json())


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.215.14", "2001:4860:4860::8888", "127.0.0.1", "10.0.0.1",
                                     "169.254.169.254", "::1", "::ffff:8.8.8.8", "2002:7f00:1::", "64:ff9b::a00:1",
                                     "224.0.0.1", "ff0e::1", "100.64.0.1", "fd00::1", "0.0.0.0", "240.0.0.1"])
def test_the_proposal_check_and_the_fetch_agree_on_addresses(address):
    import ipaddress

    assert specs.address_is_public(ipaddress.ip_address(address)) == fetch_address_is_public(address)


def test_the_form_names_the_pattern(client, member):
    client.force_login(member)
    response = client.post("/proposals/new/", {
        "kind": "guardrail", "title": "No lookaround", "action": "adopt", "guardrail_kind": "output_filter",
        "patterns": "fine\nfoo(?=bar)", "description": "d"})
    assert response.status_code == 400
    html = response.content.decode()
    assert "Pattern 2: Not a valid regular expression for the linear-time RE2 engine: invalid perl operator" in html
    assert not Proposal.objects.exists()


@pytest.mark.parametrize("source", ["file:/etc/shadow", "https://169.254.169.254/latest/meta-data/"])
def test_the_training_form_puts_the_refusal_on_the_source_input(client, member, data_root, source):
    client.force_login(member)
    response = client.post("/proposals/new/", {
        "kind": "training", "title": "Steal", "model_name": "byte-gpt-small", "dataset_source": source,
        "dataset_sha256": SHA, "heldout_fraction": "0.1"})
    assert response.status_code == 400
    html = response.content.decode()
    assert '<ul class="errorlist" id="id_dataset_source-errors">' in html
    assert "not a public address" in html or "under the server&#x27;s data root" in html
    assert not Proposal.objects.exists() and not Entry.objects.exists()
