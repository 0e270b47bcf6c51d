"""Accounts: sign up with e-mail verification, log in and out, profile, API tokens; failed log-ins lock out
(form and API alike), log-in and sign-up are rate limited per address and per account."""

import re

import pytest
from allauth.account.models import EmailAddress
from axes.models import AccessAttempt
from django.contrib.auth import get_user_model
from django.core import mail
from django.core.management import call_command
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from governance.eligibility import voter_eligibility
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db
PASSWORD = "correct horse battery"
TOKEN_URL = "/api/v1/auth/token"


def set_rates(settings, **rates):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], **rates}}


def form_login(client, username, password, **extra):
    return client.post("/accounts/login/", {"login": username, "password": password}, **extra)


def api_login(client, username, password, **extra):
    return client.post(TOKEN_URL, {"username": username, "password": password}, format="json", **extra)


# --- sign up and e-mail verification -----------------------------------------------------------

def test_sign_up_logs_in_sends_a_verification_mail_and_verifying_makes_the_member_eligible(client):
    response = client.post(
        "/accounts/signup/",
        {"username": "newbie", "email": "n@example.org", "password1": "a-long pass phrase",
         "password2": "a-long pass phrase"},
        follow=True,
    )
    assert response.status_code == 200
    assert response.context["user"].username == "newbie"
    user = get_user_model().objects.get(username="newbie")
    address = EmailAddress.objects.get(user=user)
    assert address.email == "n@example.org" and not address.verified
    assert "a verified e-mail address" in voter_eligibility(user).reason

    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["n@example.org"]
    link = re.search(r"https?://[^\s]+/accounts/confirm-email/[^\s]+/", mail.outbox[0].body).group(0)
    path = link.split("://", 1)[1].split("/", 1)[1]
    assert client.get(f"/{path}").status_code == 200  # a page with a button: GET alone changes nothing
    assert not EmailAddress.objects.get(user=user).verified
    client.post(f"/{path}")
    assert EmailAddress.objects.get(user=user).verified


def test_sign_up_needs_an_email_address_and_matching_passwords_and_stores_nothing_otherwise(client):
    response = client.post(
        "/accounts/signup/",
        {"username": "newbie", "password1": "a-long pass phrase", "password2": "another phrase!"},
    )
    assert response.status_code == 200
    errors = response.context["form"].errors
    assert "email" in errors and "password2" in errors
    assert not get_user_model().objects.filter(username="newbie").exists()
    assert not mail.outbox


def test_an_address_already_taken_cannot_sign_up_again(client, member):
    response = client.post(
        "/accounts/signup/",
        {"username": "other", "email": member.email, "password1": "a-long pass phrase",
         "password2": "a-long pass phrase"},
    )
    assert response.status_code == 200 and "email" in response.context["form"].errors
    assert not get_user_model().objects.filter(username="other").exists()


# --- log in and out, profile, tokens -----------------------------------------------------------

def test_log_in_and_out(client, member):
    response = form_login(client, member.username, PASSWORD)
    assert response.status_code == 302
    assert client.get("/accounts/profile/").status_code == 200
    client.post("/accounts/logout/")
    assert client.get("/accounts/profile/").status_code == 302


def test_log_in_returns_to_the_page_that_asked_for_it(client, member):
    assert 'name="next"' in client.get("/accounts/login/?next=/proposals/").content.decode()
    response = client.post("/accounts/login/", {"login": member.username, "password": PASSWORD, "next": "/proposals/"})
    assert response.status_code == 302 and response["Location"] == "/proposals/"


def test_wrong_password_is_refused(client, member):
    response = form_login(client, member.username, "nope")
    assert response.status_code == 200
    assert response.context["form"].errors
    assert client.get("/accounts/profile/").status_code == 302


def test_profile_requires_login(client):
    response = client.get("/accounts/profile/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_profile_says_whether_the_member_may_vote(client):
    unverified = UserFactory(verified=False)
    client.force_login(unverified)
    page = client.get("/accounts/profile/").content.decode()
    assert "You cannot vote yet" in page and "verified e-mail address" in page


def test_profile_creates_and_replaces_the_api_token(client, member):
    client.force_login(member)
    client.post("/accounts/profile/", {"action": "api-token"})
    first = Token.objects.get(user=member).key
    client.post("/accounts/profile/", {"action": "api-token"})
    assert Token.objects.get(user=member).key != first


def test_api_token_endpoint(api_client, member):
    ok = api_login(api_client, member.username, PASSWORD)
    assert ok.status_code == 200
    assert ok.json()["token"] == Token.objects.get(user=member).key
    bad = api_login(api_client, member.username, "wrong")
    assert bad.status_code == 400 and bad.json()["error"] == "invalid"
    missing = api_client.post(TOKEN_URL, {"username": member.username})
    assert missing.status_code == 400 and "password" in missing.json()["fields"]


def test_token_authenticates_api_calls(api_client, member):
    token = Token.objects.create(user=member)
    api_client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    # any authenticated-only endpoint: posting a malformed proposal must reach validation, not 401/403
    response = api_client.post("/api/v1/proposals/", {}, format="json")
    assert response.status_code == 400


def test_anonymous_cannot_write_through_the_api(api_client):
    response = api_client.post("/api/v1/proposals/", {}, format="json")
    assert response.status_code in (401, 403)
    assert "error" in response.json()


# --- lockout after failed log-ins (django-axes) -----------------------------------------------

@pytest.fixture
def lockout(settings):
    settings.AXES_FAILURE_LIMIT = 3
    return settings


def test_failed_form_log_ins_lock_the_account_out_with_a_clear_message(client, member, lockout):
    codes = [form_login(client, member.username, "wrong").status_code for _ in range(3)]
    assert codes[:2] == [200, 200] and codes[2] == 429
    # Even the right password is refused now, with a message that says what happened and for how long.
    locked = form_login(client, member.username, PASSWORD)
    assert locked.status_code == 429
    assert "locked" in locked.content.decode() and "15 minutes" in locked.content.decode()
    assert int(locked["Retry-After"]) == 15 * 60
    assert client.get("/accounts/profile/").status_code == 302


def test_failed_api_log_ins_lock_out_the_api_and_the_form(member, lockout, client):
    api = APIClient()
    for _ in range(3):
        api_login(api, member.username, "wrong")
    locked = api_login(api, member.username, PASSWORD)
    assert locked.status_code == 429
    assert locked.json()["error"] == "locked_out" and "locked" in locked.json()["detail"]
    assert int(locked["Retry-After"]) > 0
    assert form_login(client, member.username, PASSWORD).status_code == 429  # one lockout for both


def test_lockout_is_per_account_and_address_so_others_are_not_locked_out(client, member, other_member, lockout):
    for _ in range(3):
        form_login(client, member.username, "wrong")
    assert form_login(client, other_member.username, PASSWORD).status_code == 302
    elsewhere = APIClient(REMOTE_ADDR="198.51.100.7")
    assert api_login(elsewhere, member.username, PASSWORD).status_code == 200


def test_rotating_forwarded_for_does_not_escape_a_lockout(client, member, lockout):
    for n in range(3):
        form_login(client, member.username, "wrong", HTTP_X_FORWARDED_FOR=f"203.0.113.{n}")
    locked = form_login(client, member.username, PASSWORD, HTTP_X_FORWARDED_FOR="203.0.113.99")
    assert locked.status_code == 429


def test_staff_reset_a_lockout_with_axes_command(client, member, lockout):
    for _ in range(3):
        form_login(client, member.username, "wrong")
    assert AccessAttempt.objects.filter(username=member.username).exists()
    call_command("axes_reset_username", member.username)
    assert form_login(client, member.username, PASSWORD).status_code == 302


def test_a_successful_log_in_clears_earlier_failures(client, member, lockout):
    for _ in range(2):
        form_login(client, member.username, "wrong")
    assert form_login(client, member.username, PASSWORD).status_code == 302
    client.post("/accounts/logout/")
    for _ in range(2):
        form_login(client, member.username, "wrong")
    assert form_login(client, member.username, PASSWORD).status_code == 302


# --- rate limits per address and per account ---------------------------------------------------

def test_form_log_in_is_limited_per_address_and_forwarded_for_does_not_help(client, member, settings):
    set_rates(settings, login_address="3/min")
    codes = [form_login(client, f"nobody{n}", "x", HTTP_X_FORWARDED_FOR=f"198.51.100.{n}").status_code
             for n in range(4)]
    assert codes == [200, 200, 200, 429]
    limited = form_login(client, member.username, PASSWORD)
    assert limited.status_code == 429 and int(limited["Retry-After"]) >= 1
    assert "Too many attempts from your address" in limited.content.decode()
    # Another address is not affected.
    assert form_login(client, member.username, PASSWORD, REMOTE_ADDR="198.51.100.200").status_code == 302


def test_log_in_is_limited_per_account_across_addresses(member, settings):
    set_rates(settings, login_account="2/min")
    clients = [APIClient(REMOTE_ADDR=f"192.0.2.{n}") for n in range(3)]
    assert api_login(clients[0], member.username, "wrong").status_code == 400
    assert form_login(clients[1], member.username.upper(), "wrong").status_code == 200  # same account
    limited = api_login(clients[2], member.username, PASSWORD)
    assert limited.status_code == 429 and limited.json()["error"] == "throttled"
    assert int(limited["Retry-After"]) >= 1


def test_api_token_is_limited_per_address_whatever_forwarded_for_says(member, settings):
    set_rates(settings, login_address="2/min")
    api = APIClient()
    codes = [api_login(api, member.username, "wrong", HTTP_X_FORWARDED_FOR=f"10.0.0.{n}").status_code
             for n in range(3)]
    assert codes == [400, 400, 429]


def test_sign_up_is_limited_per_address(client, settings):
    set_rates(settings, signup_address="2/hour")
    for n in range(2):
        client.post("/accounts/signup/", {"username": f"sock{n}", "email": f"s{n}@example.org",
                                          "password1": "a-long pass phrase", "password2": "a-long pass phrase"},
                    HTTP_X_FORWARDED_FOR=f"203.0.113.{n}")
        client.post("/accounts/logout/")
    third = client.post("/accounts/signup/", {"username": "sock2", "email": "s2@example.org",
                                              "password1": "a-long pass phrase", "password2": "a-long pass phrase"},
                        HTTP_X_FORWARDED_FOR="203.0.113.77")
    assert third.status_code == 429 and int(third["Retry-After"]) > 0
    assert sorted(get_user_model().objects.values_list("username", flat=True)) == ["sock0", "sock1"]
    assert client.get("/accounts/signup/").status_code == 200  # showing the form is not counted


def test_changing_the_case_of_the_username_does_not_reset_the_failure_count(client, member, lockout):
    for name in (member.username, member.username.upper(), member.username.title()):
        form_login(client, name, "wrong")
    assert form_login(client, member.username, PASSWORD).status_code == 429


def test_the_admin_log_in_form_is_limited_and_locks_out_too(client, staff, settings, lockout):
    for _ in range(3):
        client.post("/admin/login/", {"username": staff.username, "password": "wrong"})
    assert client.post("/admin/login/", {"username": staff.username, "password": PASSWORD}).status_code == 429
    set_rates(settings, login_address="1/min")
    other = client.post("/admin/login/", {"username": "x", "password": "y"}, REMOTE_ADDR="192.0.2.50")
    assert other.status_code == 200
    assert client.post("/admin/login/", {"username": "x", "password": "y"},
                       REMOTE_ADDR="192.0.2.50").status_code == 429


@pytest.mark.parametrize("path", ["/accounts/email/", "/accounts/password/reset/", "/accounts/password/change/",
                                  "/accounts/logout/"])
def test_allauth_pages_render_in_agora_layout(client, member, path):
    client.force_login(member)
    response = client.get(path)
    assert response.status_code == 200
    assert 'class="site-header"' in response.content.decode()


def test_staff_lift_a_lockout_in_the_admin(client, member, lockout):
    for _ in range(3):
        form_login(client, member.username, "wrong")
    assert form_login(client, member.username, PASSWORD).status_code == 429
    staff_client = type(client)()
    staff_client.force_login(UserFactory(is_staff=True, is_superuser=True))
    attempts = list(AccessAttempt.objects.values_list("pk", flat=True))
    page = staff_client.get("/admin/axes/accessattempt/")
    assert page.status_code == 200 and member.username in page.content.decode()
    staff_client.post("/admin/axes/accessattempt/", {"action": "delete_selected", "_selected_action": attempts,
                                                     "post": "yes"})
    assert not AccessAttempt.objects.exists()
    assert form_login(client, member.username, PASSWORD).status_code == 302
