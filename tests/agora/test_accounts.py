"""Accounts: sign up, log in and out, profile, API tokens; and the settings' embedded default."""

import pytest
from django.contrib.auth import get_user_model
from rest_framework.authtoken.models import Token

pytestmark = pytest.mark.django_db


def test_sign_up_logs_the_new_member_in(client):
    response = client.post(
        "/accounts/signup/",
        {"username": "newbie", "email": "n@example.org", "password1": "a-long pass phrase", "password2": "a-long pass phrase"},
        follow=True,
    )
    assert response.status_code == 200
    assert response.context["user"].username == "newbie"
    assert b"Welcome to Agora" in response.content


def test_sign_up_with_mismatched_passwords_names_the_field_and_stores_nothing(client):
    response = client.post(
        "/accounts/signup/",
        {"username": "newbie", "password1": "a-long pass phrase", "password2": "another phrase!"},
    )
    assert response.status_code == 200
    assert "password2" in response.context["form"].errors
    assert not get_user_model().objects.filter(username="newbie").exists()


def test_log_in_and_out(client, member):
    response = client.post("/accounts/login/", {"username": member.username, "password": "correct horse battery"})
    assert response.status_code == 302
    assert client.get("/accounts/profile/").status_code == 200
    client.post("/accounts/logout/")
    assert client.get("/accounts/profile/").status_code == 302


def test_wrong_password_is_refused(client, member):
    response = client.post("/accounts/login/", {"username": member.username, "password": "nope"})
    assert response.status_code == 200
    assert response.context["form"].errors


def test_profile_requires_login(client):
    response = client.get("/accounts/profile/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_profile_creates_and_replaces_the_api_token(client, member):
    client.force_login(member)
    client.post("/accounts/profile/", {"action": "api-token"})
    first = Token.objects.get(user=member).key
    client.post("/accounts/profile/", {"action": "api-token"})
    assert Token.objects.get(user=member).key != first


def test_api_token_endpoint(api_client, member):
    ok = api_client.post("/api/v1/auth/token", {"username": member.username, "password": "correct horse battery"})
    assert ok.status_code == 200
    assert ok.json()["token"] == Token.objects.get(user=member).key
    bad = api_client.post("/api/v1/auth/token", {"username": member.username, "password": "wrong"})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid"
    missing = api_client.post("/api/v1/auth/token", {"username": member.username})
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
