# The Agora server image: web (gunicorn + whitenoise), Celery worker and beat all run from it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    DJANGO_STATIC_MANIFEST=1 AGORA_VAR_DIR=/var/lib/agora
WORKDIR /app

RUN useradd --create-home --uid 1000 agora && mkdir -p /var/lib/agora && chown agora /var/lib/agora
COPY pyproject.toml README.md ./
COPY agora ./agora
COPY governance ./governance
COPY marketplace ./marketplace
COPY training ./training
COPY ledger ./ledger
COPY diloco ./diloco
COPY workers ./workers
# Point PIP_EXTRA_INDEX_URL at a CPU-only PyTorch index to keep the image small (the server never needs CUDA).
ARG PIP_EXTRA_INDEX_URL=""
RUN pip install ".[server]"
COPY manage.py ./
COPY templates ./templates
COPY static ./static
RUN DJANGO_SECRET_KEY=collectstatic-only python manage.py collectstatic --noinput

USER agora
EXPOSE 8000
CMD ["gunicorn", "agora.wsgi", "--bind", "0.0.0.0:8000", "--workers", "4", "--threads", "4", "--worker-class", "gthread", "--access-logfile", "-"]
