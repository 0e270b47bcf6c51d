"""One client address for everything (core.client_ip), believed from X-Forwarded-For only as far as the
trusted-proxy settings say; and every rate limit keyed on it holds against rotating forwarded headers."""

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from allauth.account.adapter import get_adapter
from axes.helpers import get_client_ip_address
from django.test import RequestFactory
from rest_framework.test import APIClient

from core import ratelimit
from core.client_ip import client_ip, client_rate_key
from core.ratelimit import consume
from core.rates import parse_rate
from marketplace.services import enrollment_token_create
from tests.factories import UserFactory
from tests.governance.factories import ProposalFactory
from tests.marketplace.factories import WorkerFactory, bearer, enroll_body


def request(remote="192.0.2.10", forwarded=None):
    extra = {"REMOTE_ADDR": remote}
    if forwarded is not None:
        extra["HTTP_X_FORWARDED_FOR"] = forwarded
    return RequestFactory().get("/", **extra)


def set_rates(settings, **rates):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], **rates}}


# --- the address ----------------------------------------------------------------------------------

def test_without_a_proxy_setting_forwarded_for_is_ignored(settings):
    settings.AGORA_TRUSTED_PROXIES, settings.AGORA_TRUSTED_PROXY_COUNT = [], 0
    assert client_ip(request("192.0.2.10", "203.0.113.5")) == "192.0.2.10"
    assert client_ip(request("192.0.2.10")) == "192.0.2.10"


@pytest.mark.parametrize("forwarded, count, expected", [
    ("203.0.113.5", 1, "203.0.113.5"),
    ("6.6.6.6, 203.0.113.5", 1, "203.0.113.5"),  # what the client wrote itself is not believed
    ("6.6.6.6, 203.0.113.5, 10.0.0.2", 2, "203.0.113.5"),
    ("203.0.113.5", 2, "192.0.2.10"),  # fewer hops than proxies: not believed, the peer is used
    ("not-an-address", 1, "192.0.2.10"),
    ("[2001:db8::7]:443", 1, "2001:db8::7"),
    ("203.0.113.5:5555", 1, "203.0.113.5"),
    ("::ffff:203.0.113.5", 1, "203.0.113.5"),
])
def test_a_proxy_count_takes_that_many_hops_from_the_right(settings, forwarded, count, expected):
    settings.AGORA_TRUSTED_PROXIES, settings.AGORA_TRUSTED_PROXY_COUNT = [], count
    assert client_ip(request("192.0.2.10", forwarded)) == expected


@pytest.mark.parametrize("remote, forwarded, expected", [
    ("10.0.0.1", "203.0.113.5", "203.0.113.5"),
    ("10.0.0.1", "6.6.6.6, 203.0.113.5, 10.0.0.9", "203.0.113.5"),  # walks past every trusted proxy
    ("192.0.2.77", "203.0.113.5", "192.0.2.77"),  # a peer that is not a trusted proxy: header ignored
    ("10.0.0.1", "", "10.0.0.1"),
    ("10.0.0.1", "garbage, 10.0.0.3", "10.0.0.3"),
])
def test_trusted_proxy_networks_are_walked_from_the_right(settings, remote, forwarded, expected):
    settings.AGORA_TRUSTED_PROXIES, settings.AGORA_TRUSTED_PROXY_COUNT = ["10.0.0.0/8"], 0
    assert client_ip(request(remote, forwarded)) == expected


def test_ipv6_clients_are_counted_per_network_and_an_unknown_peer_lumped_together(settings):
    assert client_rate_key(request("2001:db8:1:2:aaaa::1")) == client_rate_key(request("2001:db8:1:2:bbbb::9"))
    assert client_rate_key(request("2001:db8:1:3::1")) != client_rate_key(request("2001:db8:1:2::1"))
    settings.AGORA_RATE_IPV6_PREFIX = 128
    assert client_rate_key(request("2001:db8:1:2:aaaa::1")) == "2001:db8:1:2:aaaa::1/128"
    assert client_rate_key(request("")) == "unknown" and client_ip(request("")) is None


def test_axes_and_allauth_see_the_same_address(settings):
    settings.AGORA_TRUSTED_PROXY_COUNT = 1
    req = request("10.0.0.1", "6.6.6.6, 203.0.113.5")
    assert get_client_ip_address(req) == get_adapter().get_client_ip(req) == client_ip(req) == "203.0.113.5"


# --- limits hold against rotating X-Forwarded-For ------------------------------------------------

@pytest.mark.django_db
def test_enrollment_is_limited_per_address_whatever_forwarded_for_says(settings):
    set_rates(settings, enroll="2/min")
    api = APIClient()
    codes = [api.post("/api/v1/workers/enroll", {}, format="json", HTTP_X_FORWARDED_FOR=f"203.0.113.{n}").status_code
             for n in range(3)]
    assert codes == [400, 400, 429]


@pytest.mark.django_db
def test_behind_a_trusted_proxy_each_client_gets_its_own_budget(settings):
    set_rates(settings, enroll="1/min")
    settings.AGORA_TRUSTED_PROXIES = ["10.0.0.0/8"]
    proxy = APIClient(REMOTE_ADDR="10.0.0.1")
    first = [proxy.post("/api/v1/workers/enroll", {}, format="json", HTTP_X_FORWARDED_FOR=f"203.0.113.{n}")
             for n in range(2)]
    assert [r.status_code for r in first] == [400, 400]  # two clients, one request each
    again = proxy.post("/api/v1/workers/enroll", {}, format="json", HTTP_X_FORWARDED_FOR="203.0.113.0")
    assert again.status_code == 429 and int(again["Retry-After"]) >= 1


@pytest.mark.django_db
def test_enrollment_is_limited_per_member_across_addresses(settings):
    set_rates(settings, enroll_account="2/hour")
    owner = UserFactory()
    codes = []
    for n in range(3):
        token = enrollment_token_create(owner=owner, name=f"rig {n}").token
        api = APIClient(REMOTE_ADDR=f"198.51.100.{n}")
        codes.append(api.post("/api/v1/workers/enroll", enroll_body(token), format="json").status_code)
    assert codes == [201, 201, 429]
    other = enrollment_token_create(owner=UserFactory(), name="theirs").token
    assert APIClient(REMOTE_ADDR="198.51.100.9").post(
        "/api/v1/workers/enroll", enroll_body(other), format="json").status_code == 201


@pytest.mark.django_db
def test_task_claim_is_limited_per_worker_and_per_address(settings):
    set_rates(settings, claim_worker="2/min", claim_address="4/min")
    one, two = WorkerFactory(), WorkerFactory()
    first = APIClient(REMOTE_ADDR="198.51.100.1")
    first.credentials(**bearer(one))
    codes = [first.post("/api/v1/tasks/claim", HTTP_X_FORWARDED_FOR=f"203.0.113.{n}").status_code for n in range(3)]
    assert codes == [204, 204, 429]
    second = APIClient(REMOTE_ADDR="198.51.100.1")  # same address, another worker: its own per-worker budget...
    second.credentials(**bearer(two))
    assert second.post("/api/v1/tasks/claim").status_code == 204
    limited = second.post("/api/v1/tasks/claim", HTTP_X_FORWARDED_FOR="203.0.113.200")  # ...not the address's
    assert limited.status_code == 429 and limited.json()["error"] == "throttled" and int(limited["Retry-After"]) >= 1
    elsewhere = APIClient(REMOTE_ADDR="198.51.100.2")  # a third worker at another address is unaffected
    elsewhere.credentials(**bearer(WorkerFactory()))
    assert elsewhere.post("/api/v1/tasks/claim").status_code == 204


@pytest.mark.django_db
def test_comments_are_limited_per_account_and_per_address_in_the_api_and_the_form(settings, client):
    set_rates(settings, comment_account="2/min", comment_address="3/min")
    proposal = ProposalFactory(status="active")
    url = f"/api/v1/proposals/{proposal.pk}/comments"
    author = UserFactory()
    api = APIClient(REMOTE_ADDR="198.51.100.1")
    api.force_authenticate(author)
    assert api.post(url, {"body": "one"}, format="json").status_code == 201
    client.force_login(author)
    form = client.post(f"/proposals/{proposal.pk}/comment", {"body": "two"}, REMOTE_ADDR="198.51.100.2")
    assert form.status_code == 302
    limited = client.post(f"/proposals/{proposal.pk}/comment", {"body": "three"}, REMOTE_ADDR="198.51.100.3")
    assert limited.status_code == 429 and int(limited["Retry-After"]) >= 1
    assert "for this account" in limited.content.decode()
    assert api.post(url, {"body": "four"}, format="json").status_code == 429
    assert api.get(url).status_code == 200  # reading is not limited
    # Another account on the first address, which has two of its three posts counted ("one", "four"):
    # one more gets through, then the address is full whatever X-Forwarded-For says.
    neighbour = APIClient(REMOTE_ADDR="198.51.100.1")
    neighbour.force_authenticate(UserFactory())
    codes = [neighbour.post(url, {"body": f"n{n}"}, format="json", HTTP_X_FORWARDED_FOR=f"203.0.113.{n}").status_code
             for n in range(3)]
    assert codes == [201, 429, 429]
    assert proposal.comments.count() == 3


@pytest.mark.parametrize("name, value", [("AGORA_TRUSTED_PROXIES", "10.0.0.0/33"), ("AGORA_RATE_LOGIN_ADDRESS", "lots"),
                                         ("AGORA_RATE_CLAIM_WORKER", "5/fortnight")])
def test_the_server_refuses_to_start_with_a_malformed_proxy_or_rate_setting(tmp_path, name, value):
    env = {**os.environ, name: value, "AGORA_VAR_DIR": str(tmp_path), "DJANGO_SECRET_KEY": "test",
           "DJANGO_SETTINGS_MODULE": "agora.settings"}
    done = subprocess.run([sys.executable, "-c", "import django; django.setup()"], env=env,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "ImproperlyConfigured" in done.stderr and value.split("/")[-1] in done.stderr


# --- the counter ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rate, parsed", [("10/min", (10, 60)), ("5/15min", (5, 900)), ("1/s", (1, 1)),
                                          ("30/hour", (30, 3600)), ("2/days", (2, 86400))])
def test_rates_are_read_like_drf_and_with_a_multiplier(rate, parsed):
    assert parse_rate(rate) == parsed


def test_a_window_answers_how_long_to_wait_and_then_opens_again(settings):
    set_rates(settings, login_address="2/min")
    start = datetime(2026, 5, 1, 12, 0, 45, tzinfo=UTC)
    with time_machine.travel(start, tick=False):
        assert [consume("login_address", "a") for _ in range(3)] == [None, None, 15]
        assert consume("login_address", "b") is None  # another key, its own count
    with time_machine.travel(start + timedelta(seconds=15), tick=False):
        assert consume("login_address", "a") is None


def test_a_limit_fails_open_with_a_warning_when_the_cache_is_down(settings, monkeypatch, caplog):
    set_rates(settings, login_address="1/min")

    def down(*args, **kwargs):
        raise ConnectionError("cache is down")

    monkeypatch.setattr(ratelimit.cache, "add", down)
    assert [consume("login_address", "a") for _ in range(3)] == [None, None, None]
    assert "not enforced" in caplog.text
