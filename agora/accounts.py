"""Accounts: sign up, log in and e-mail verification (django-allauth), the profile, the API token endpoint,
and how they are rate limited and locked out.

- Per-address and per-account limits (``core.ratelimit``, scopes ``login_*`` and ``signup_address``) wrap
  allauth's log-in and sign-up views and the API token endpoint; over the limit they answer 429 with
  ``Retry-After``.
- Repeated failed log-ins lock the account out from that address (django-axes, in the database): the form
  and ``POST /api/v1/auth/token`` both count, both answer 429 ``locked_out`` while it lasts.
- The client address is ``core.client_ip.client_ip`` everywhere: allauth (through the adapter), axes
  (``AXES_CLIENT_IP_CALLABLE``) and the limits.
"""

from __future__ import annotations

from allauth.account import views as allauth_views
from allauth.account.adapter import DefaultAccountAdapter
from allauth.account.models import EmailAddress
from axes.handlers.proxy import AxesProxyHandler
from axes.helpers import get_cool_off
from django.contrib import admin, messages
from django.contrib.auth.decorators import login_required
from django.http import JsonResponse
from django.shortcuts import redirect, render
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.authtoken.models import Token
from rest_framework.authtoken.serializers import AuthTokenSerializer
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from agora.profile import profile_context
from core.client_ip import client_ip, client_rate_key
from core.ratelimit import per_account, per_address, rate_limited, submitted_username
from governance.eligibility import voter_eligibility

LOCKOUT_CODE = "locked_out"


class AccountAdapter(DefaultAccountAdapter):
    def get_client_ip(self, request) -> str:
        # allauth refuses a request whose address it cannot tell; a Unix-socket peer is still a client.
        return client_ip(request) or "0.0.0.0"


def axes_username(request, credentials: dict | None) -> str | None:
    """The account a log-in attempt is for, whichever way it was sent (allauth's form says ``login``).

    Case-folded: allauth matches usernames without regard to case, so ``Alice`` and ``alice`` must share
    one failure count (``axes_reset_username`` takes the lower-case name)."""
    for source in (credentials or {}, getattr(request, "POST", {})):
        for name in ("username", "login"):
            value = source.get(name)
            if isinstance(value, str) and value.strip():
                return value.strip().casefold()
    return None


def _lockout_text(request) -> tuple[str, int]:
    cool_off = get_cool_off(request)
    seconds = int(cool_off.total_seconds()) if cool_off else 0
    minutes = max(1, round(seconds / 60))
    text = (
        f"Too many failed log-in attempts for this account from your address: log-in is locked for "
        f"{minutes} minute{'s' if minutes != 1 else ''}. Staff can lift the lockout sooner."
    )
    return text, seconds


def lockout_response(request, original_response=None, credentials=None):
    """What axes answers while an account is locked out: JSON for the API, a page for people."""
    text, seconds = _lockout_text(request)
    if request.path.startswith("/api/"):
        response = JsonResponse({"error": LOCKOUT_CODE, "detail": text}, status=429)
    else:
        response = render(request, "account/lockout.html", {"detail": text}, status=429)
    if seconds:
        response["Retry-After"] = str(seconds)
    return response


_login_limits = (
    ("login_address", client_rate_key, "address"),
    ("login_account", submitted_username, "account"),
)
login = rate_limited(*_login_limits)(allauth_views.login)
admin_login = rate_limited(*_login_limits)(admin.site.login)
signup = rate_limited(("signup_address", client_rate_key, "address"))(allauth_views.signup)


@login_required
def profile(request):
    token = Token.objects.filter(user=request.user).first()
    if request.method == "POST" and request.POST.get("action") == "api-token":
        Token.objects.filter(user=request.user).delete()
        token = Token.objects.create(user=request.user)
        messages.success(request, "A new API token was created; the old one no longer works.")
        return redirect("profile")
    context = {
        "api_token": token,
        "emails": list(EmailAddress.objects.filter(user=request.user).order_by("-primary", "email")),
        "eligibility": voter_eligibility(request.user),
        **profile_context(request.user),
    }
    return render(request, "agora/profile.html", context)


class TokenApi(APIView):
    """Exchange a username and password for the member's API token (``Authorization: Token …``).

    Limited per address and per account name (429 ``throttled``); after repeated failures the account is
    locked out from that address (429 ``locked_out``) exactly as on the log-in form.
    """

    permission_classes = [AllowAny]
    authentication_classes = []
    throttle_classes = [per_address("login_address"), per_account("login_account", submitted_username)]

    @extend_schema(
        request=AuthTokenSerializer,
        responses=inline_serializer("TokenResponse", {"token": serializers.CharField()}),
    )
    def post(self, request):
        # axes watches the Django request: it records the failure and marks the lockout on it.
        http_request = request._request
        username = axes_username(None, request.data if isinstance(request.data, dict) else None)
        if username and AxesProxyHandler.is_locked(http_request, {"username": username}):
            return lockout_response(http_request)
        serializer = AuthTokenSerializer(data=request.data, context={"request": http_request})
        if not serializer.is_valid():
            if getattr(http_request, "axes_locked_out", False):
                return lockout_response(http_request)
            serializer.is_valid(raise_exception=True)
        token, _ = Token.objects.get_or_create(user=serializer.validated_data["user"])
        return Response({"token": token.key})
