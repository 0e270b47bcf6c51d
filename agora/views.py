from django.db import connection
from django.http import JsonResponse
from django.shortcuts import render

from agora.home import home_context


def home(request):
    return render(request, "agora/home.html", home_context(request.user))


def healthz(request):
    """Liveness for load balancers and docker-compose: the database answers."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"ok": True})


def ping(request):
    """The trivial view benchmarks compare against."""
    return JsonResponse({"pong": True})
