from allauth.account import views as allauth_views
from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from agora import accounts, views
from core.admin import brand

brand(admin.site)
handler404 = "agora.errors.page_not_found"
handler500 = "agora.errors.server_error"
handler403 = "agora.errors.permission_denied"

api_v1 = [
    path("auth/token", accounts.TokenApi.as_view(), name="api-auth-token"),
    path("", include("ledger.api_urls")),
    path("", include("governance.api_urls")),
    path("", include("marketplace.api_urls")),
    path("", include("training.api_urls")),
]

urlpatterns = [
    # The API first: agents poll it thousands of times a second, so it should resolve without walking
    # the page patterns.
    path("api/v1/", include(api_v1)),
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("ping", views.ping, name="ping"),
    # allauth's views under our old names and paths (rate limited), then the rest of allauth's (e-mail
    # confirmation, e-mail management, password reset) under /accounts/.
    path("accounts/signup/", accounts.signup, name="signup"),
    path("accounts/login/", accounts.login, name="login"),
    path("accounts/logout/", allauth_views.logout, name="logout"),
    path("accounts/profile/", accounts.profile, name="profile"),
    path("accounts/", include("allauth.urls")),
    path("", include("governance.urls")),
    path("", include("marketplace.urls")),
    path("", include("training.urls")),
    path("ledger/", include("ledger.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api/redoc/", SpectacularRedocView.as_view(url_name="schema"), name="api-redoc"),
    path("admin/login/", accounts.admin_login),  # the admin's own log-in form, limited like ours
    path("admin/", admin.site.urls),
]
