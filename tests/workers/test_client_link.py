"""The agent's link: a token bucket per direction paces uploads and downloads (``--max-mbps``), and every
body that passes is counted."""

import hashlib

import pytest

from workers.client import Client, LinkStats, TokenBucket


class FrozenClock:
    """Time that moves only when someone sleeps: a bucket's waits add up exactly."""

    def __init__(self):
        self.now = 0.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.now += seconds


def test_a_bucket_lets_its_burst_through_then_paces_at_its_rate():
    clock = FrozenClock()
    bucket = TokenBucket(1000.0, burst=100.0, clock=clock, sleep=clock.sleep)
    assert bucket.consume(100) == 0.0  # the burst passes at once
    assert bucket.consume(500) == pytest.approx(0.5)
    clock.now += 10.0  # idle time refills it, but never beyond the burst
    assert bucket.consume(100) == 0.0
    assert bucket.consume(1000) == pytest.approx(1.0)
    assert clock.slept == pytest.approx(1.5)


def test_a_bucket_refuses_a_rate_that_is_not_positive():
    for rate in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            TokenBucket(rate)


def test_from_mbps_is_megabits_per_second():
    assert TokenBucket.from_mbps(100).rate == 12_500_000


def _paced_client(fake_server, clock, *, rate=10_000.0, burst=1_000.0):
    up = TokenBucket(rate, burst=burst, clock=clock, sleep=clock.sleep)
    down = TokenBucket(rate, burst=burst, clock=clock, sleep=clock.sleep)
    return Client(fake_server.url, "wkr_secret", timeout=5, buckets=(up, down))


def test_downloads_are_paced_by_the_download_bucket_and_counted(fake_server, tmp_path):
    data = bytes(range(256)) * 200  # 51,200 bytes
    sha = hashlib.sha256(data).hexdigest()
    fake_server.on("GET", f"/api/v1/checkpoints/{sha}", (200, data))
    clock = FrozenClock()
    with _paced_client(fake_server, clock) as client:
        client.download_checkpoint(sha, tmp_path / "ck.safetensors")
        assert client.stats.snapshot() == (0, len(data))
        assert client.upload_bucket is not None and client.download_bucket is not None
    # 10,000 bytes/s after a 1,000-byte burst: the link took (51,200 - 1,000) / 10,000 s.
    assert clock.slept == pytest.approx((len(data) - 1_000) / 10_000.0)


def test_uploads_are_paced_by_the_upload_bucket_and_counted(fake_server):
    fake_server.on("POST", "/api/v1/tasks/5/result", (202, {"accepted_for_aggregation": True}))
    update = b"\x01" * 30_000
    clock = FrozenClock()
    with _paced_client(fake_server, clock) as client:
        client.submit_result(5, update=update, metrics={"loss_start": 1.0})
        sent, received = client.stats.snapshot()
    rec = fake_server.calls("POST", "/api/v1/tasks/5/result")[0]
    assert rec.form["update"] == update
    assert sent > len(update) and received > 0  # the multipart envelope, the JSON answer
    # The update itself went through the bucket (the JSON answer's few bytes too, on the download side).
    assert clock.slept >= (len(update) - 1_000) / 10_000.0


def test_a_clone_shares_the_link(fake_server):
    with Client(fake_server.url, "wkr_secret", timeout=5, max_mbps=8.0) as client:
        clone = client.clone()
        try:
            assert clone.upload_bucket is client.upload_bucket and clone.download_bucket is client.download_bucket
            assert clone.stats is client.stats
            clone.heartbeat(state="idle")
            assert client.stats.snapshot()[1] > 0
        finally:
            clone.close()


def test_without_a_cap_nothing_waits():
    client = Client("http://127.0.0.1:9", "t")
    try:
        assert client.upload_bucket is None and client.download_bucket is None
        assert isinstance(client.stats, LinkStats)
    finally:
        client.close()


def test_delta_download_is_capped_in_size(fake_server):
    from workers.client import DownloadError

    sha = "b" * 64
    fake_server.on("GET", f"/api/v1/checkpoints/{sha}/delta", (200, b"d" * 5000))
    with Client(fake_server.url, "wkr_secret", timeout=5) as client:
        assert client.download_delta(sha, max_bytes=5000) == b"d" * 5000
        with pytest.raises(DownloadError):
            client.download_delta(sha, max_bytes=4999)


def test_the_cli_takes_a_link_cap_from_the_flag_or_the_environment(monkeypatch):
    from workers.cli import build_parser

    args = build_parser().parse_args(["run", "--max-mbps", "100"])
    assert args.max_mbps == 100.0
    monkeypatch.setenv("AGORA_WORKER_MAX_MBPS", "12.5")
    assert build_parser().parse_args(["run"]).max_mbps == 12.5
    monkeypatch.delenv("AGORA_WORKER_MAX_MBPS")
    assert build_parser().parse_args(["run"]).max_mbps is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--max-mbps", "fast"])
