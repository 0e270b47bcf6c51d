"""The server reads a run's dataset (for the held-out evaluation) only within AGORA_DATA_ROOT and from public
https addresses, whatever a stored spec says."""

import hashlib
import socket

import pytest

from diloco.data import DatasetError
from training import blobs

BODY = b"one doc\n\ntwo doc\n\nthree doc\n\nfour doc"


@pytest.fixture
def data_root(settings, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "corpus.txt").write_bytes(BODY)
    settings.AGORA_DATA_ROOT = root
    settings.AGORA_MAX_DATASET_BYTES = 1000
    settings.VAR_DIR = tmp_path / "var"
    blobs.clear_caches()
    yield root
    blobs.clear_caches()


def test_a_file_under_the_data_root_is_evaluated_on(data_root):
    tokens = blobs.heldout_tokens({"source": f"file:{data_root}/corpus.txt", "sha256": None,
                                   "heldout_fraction": 0.25})
    assert tokens.numel() > 0


@pytest.mark.parametrize("source", ["file:/etc/shadow", "file:/proc/self/environ", "file:/dev/zero",
                                    "file:{root}/../escape.txt", "file:{root}/link"])
def test_file_sources_outside_the_root_are_refused_at_fetch_time(data_root, source):
    (data_root.parent / "escape.txt").write_text("secret\n\nsecret")
    (data_root / "link").symlink_to(data_root.parent / "escape.txt")
    source = source.format(root=data_root)
    with pytest.raises(DatasetError, match="resolves outside the data root") as info:
        blobs.heldout_tokens({"source": source, "sha256": None, "heldout_fraction": 0.25})
    assert repr(source) in str(info.value)


def test_an_oversize_file_is_refused_at_fetch_time(data_root, settings):
    settings.AGORA_MAX_DATASET_BYTES = 10
    with pytest.raises(DatasetError, match="over the limit of 10"):
        blobs.heldout_tokens({"source": f"file:{data_root}/corpus.txt", "sha256": None, "heldout_fraction": 0.25})


@pytest.mark.parametrize("source", ["https://127.0.0.1:6379/x", "https://[::1]/x", "https://10.0.0.1/",
                                    "https://169.254.169.254/"])
def test_private_https_addresses_are_refused_at_fetch_time(data_root, source):
    with pytest.raises(DatasetError, match="non-public address") as info:
        blobs.heldout_tokens({"source": source, "sha256": hashlib.sha256(BODY).hexdigest(), "heldout_fraction": 0.25})
    assert repr(source) in str(info.value)


def test_a_name_resolving_to_a_private_address_is_refused_at_fetch_time(data_root, monkeypatch):
    def resolver(host, port, *args, **kwargs):
        assert host == "corpus.example.org"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.168.10.20", port))]

    def no_connect(*args, **kwargs):
        raise AssertionError("no connection may be made")

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    monkeypatch.setattr(socket, "create_connection", no_connect)
    with pytest.raises(DatasetError, match="corpus.example.org resolves to non-public address 192.168.10.20"):
        blobs.heldout_tokens({"source": "https://corpus.example.org/c.txt",
                              "sha256": hashlib.sha256(BODY).hexdigest(), "heldout_fraction": 0.25})
