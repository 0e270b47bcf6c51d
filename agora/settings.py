"""Agora settings, read from environment variables only.

With nothing set, Agora runs on the embedded default: SQLite, a filesystem Celery broker, a
file-based cache and checkpoints on local disk. Set DATABASE_URL and REDIS_URL for PostgreSQL and
Redis. Production secrets have no default: with DJANGO_DEBUG off, DJANGO_SECRET_KEY must be set.
"""

import ipaddress
import os
import re
import secrets
import sys
from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from core.rates import parse_rate

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()

DEBUG = env.bool("DJANGO_DEBUG", default=False)
# Management commands that only read and sign nothing run without the production secret (a throwaway key),
# so `python manage.py verify_ledger` works in any shell on the server.
READ_ONLY_COMMANDS = {"verify_ledger", "export_ledger", "check_guardrails", "showmigrations", "help", "version"}
if DEBUG:
    SECRET_KEY = env("DJANGO_SECRET_KEY", default="insecure-development-key-do-not-use-in-production")
elif "DJANGO_SECRET_KEY" not in os.environ and len(sys.argv) > 1 and Path(sys.argv[0]).name == "manage.py" \
        and sys.argv[1] in READ_ONLY_COMMANDS:
    SECRET_KEY = secrets.token_urlsafe(50)
else:
    SECRET_KEY = env("DJANGO_SECRET_KEY")
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])
# Where the embedded default keeps its files (database, broker queues, cache, checkpoints).
VAR_DIR = Path(env("AGORA_VAR_DIR", default=str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_htmx",
    "allauth",
    "allauth.account",
    "axes",
    "agora",
    "ledger",
    "governance",
    "marketplace",
    "training",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "agora.middleware.RefuseMalformedRequestsMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "allauth.account.middleware.AccountMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "axes.middleware.AxesMiddleware",  # last, as axes asks: turns a lockout into its answer
]

ROOT_URLCONF = "agora.urls"
WSGI_APPLICATION = "agora.wsgi.application"
ASGI_APPLICATION = "agora.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "governance.context_processors.notifications",
            ],
        },
    },
]

# --- database -------------------------------------------------------------------------------
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'agora.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the web process, the Celery worker and beat share the file; IMMEDIATE transactions
    # take the write lock up front, which also serialises ledger appends.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test.sqlite3")}
else:
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DATABASE_CONN_MAX_AGE", default=60))
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- cache, broker ----------------------------------------------------------------------------
REDIS_URL = env("REDIS_URL", default="")
_CACHE_TIMEOUT_S = env.float("AGORA_CACHE_TIMEOUT_S", default=0.5)
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": env("AGORA_CACHE_PREFIX", default="agora"),
            # A dead or hung Redis must cost a request a fraction of a second (callers then fail soft).
            "OPTIONS": {"socket_connect_timeout": _CACHE_TIMEOUT_S, "socket_timeout": _CACHE_TIMEOUT_S},
        }
    }
    CELERY_BROKER_URL = env("CELERY_BROKER_URL", default=REDIS_URL)
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(VAR_DIR / "cache"),
            "KEY_PREFIX": env("AGORA_CACHE_PREFIX", default="agora"),
        }
    }
    CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="filesystem://")
    _queue_dir = VAR_DIR / "celery" / "queue"
    _queue_dir.mkdir(parents=True, exist_ok=True)  # kombu's filesystem transport does not create it
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_queue_dir),
        "data_folder_out": str(_queue_dir),
        "processed_folder": str(VAR_DIR / "celery" / "processed"),
        "control_folder": str(VAR_DIR / "celery" / "control"),
        "store_processed": False,
        # How often the worker looks for new messages (kombu's default is 1 s): a result that makes a round
        # ready is aggregated, and the next round opened, that much sooner. A folder listing costs next to nothing.
        "polling_interval": env.float("AGORA_BROKER_POLL_S", default=0.1),
    }
    if CELERY_BROKER_URL.startswith("filesystem://"):
        CELERY_BROKER_TRANSPORT = "agora.broker:Transport"  # kombu's, with messages written atomically

CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE = {
    "governance-close-windows": {
        "task": "governance.close_due_proposals",
        "schedule": timedelta(seconds=env.int("AGORA_CLOSE_EVERY_S", default=30)),
    },
    "marketplace-sweep-offline": {
        "task": "marketplace.sweep_offline",
        "schedule": timedelta(seconds=env.int("AGORA_SWEEP_EVERY_S", default=30)),
    },
    "training-tick": {
        "task": "training.tick",
        "schedule": timedelta(seconds=env.int("AGORA_TRAINING_TICK_S", default=10)),
    },
    "training-sweep-blobs": {  # temporary files of blob writes that were killed
        "task": "training.sweep_blobs",
        "schedule": timedelta(seconds=env.int("AGORA_BLOB_SWEEP_EVERY_S", default=600)),
    },
}

# --- files ------------------------------------------------------------------------------------
STATIC_URL = "static/"
STATIC_MANIFEST = env.bool("DJANGO_STATIC_MANIFEST", default=False)
STATIC_ROOT = Path(env("DJANGO_STATIC_ROOT", default=str(VAR_DIR / "staticfiles")))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STATICFILES_DIRS = [BASE_DIR / "static"]
MEDIA_ROOT = Path(env("AGORA_MEDIA_ROOT", default=str(VAR_DIR / "media")))
MEDIA_URL = "media/"
CHECKPOINT_STORAGE = env("AGORA_CHECKPOINT_STORAGE", default="filesystem")  # or "s3"
_checkpoints = (
    {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": env("AGORA_S3_BUCKET", default="agora-checkpoints"),
            "endpoint_url": env("AGORA_S3_ENDPOINT_URL", default=None),
            "file_overwrite": False,
        },
    }
    if CHECKPOINT_STORAGE == "s3"
    else {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(MEDIA_ROOT / "checkpoints")},
    }
)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "checkpoints": _checkpoints,
    "staticfiles": {
        "BACKEND": (
            "whitenoise.storage.CompressedManifestStaticFilesStorage"
            if STATIC_MANIFEST
            else "django.contrib.staticfiles.storage.StaticFilesStorage"
        )
    },
}
# Production (docker-compose) sets DJANGO_STATIC_MANIFEST=1 and runs collectstatic; otherwise whitenoise
# serves straight from static/ so nothing needs collecting.
WHITENOISE_USE_FINDERS = not STATIC_MANIFEST
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("AGORA_MAX_UPLOAD_BYTES", default=256 * 1024 * 1024)
FILE_UPLOAD_MAX_MEMORY_SIZE = 8 * 1024 * 1024

# --- auth -------------------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "home"
AUTHENTICATION_BACKENDS = [
    # axes first: a locked-out account is refused before any password is checked.
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
    "allauth.account.auth_backends.AuthenticationBackend",
]
# Sign-up, log-in and e-mail verification (django-allauth). A verified address is optional to log in and
# required to vote (AGORA_VOTER_ELIGIBILITY).
ACCOUNT_ADAPTER = "agora.accounts.AccountAdapter"
ACCOUNT_LOGIN_METHODS = {"username"}
ACCOUNT_SIGNUP_FIELDS = ["username*", "email*", "password1*", "password2*"]
ACCOUNT_EMAIL_VERIFICATION = "optional"
ACCOUNT_UNIQUE_EMAIL = True
ACCOUNT_EMAIL_SUBJECT_PREFIX = "[Agora] "
ACCOUNT_DEFAULT_HTTP_PROTOCOL = "https" if env("AGORA_PUBLIC_URL", default="").startswith("https:") else "http"
# Our own per-address/per-account limits (below) and axes' lockout replace allauth's login and sign-up
# limits; allauth keeps its limits on e-mail confirmations and password resets.
ACCOUNT_RATE_LIMITS = {"login": None, "login_failed": None, "signup": None}
# Mail: the embedded default prints it on the console (so `make run` shows the verification link).
globals().update(env.email_url("EMAIL_URL", default="consolemail://"))
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", default="Agora <agora@localhost>")

# Client addresses (core/client_ip.py): X-Forwarded-For is believed only from trusted proxies, given as
# addresses/CIDR networks, or else as a count of reverse proxies in front of the app. Default: no proxy.
AGORA_TRUSTED_PROXIES = env.list("AGORA_TRUSTED_PROXIES", default=[])
for _network in AGORA_TRUSTED_PROXIES:
    try:
        ipaddress.ip_network(_network.strip(), strict=False)
    except ValueError as _exc:
        raise ImproperlyConfigured(f"AGORA_TRUSTED_PROXIES: {_exc}") from None
AGORA_TRUSTED_PROXY_COUNT = env.int("AGORA_TRUSTED_PROXY_COUNT", default=0)
AGORA_RATE_IPV6_PREFIX = env.int("AGORA_RATE_IPV6_PREFIX", default=64)  # IPv6 clients counted per /64

# Rate limits (core/ratelimit.py; 429 with Retry-After). "N/s|min|hour|day" or "N/<k><unit>"; empty = off.
AGORA_RATES = {
    "login_address": env("AGORA_RATE_LOGIN_ADDRESS", default=env("AGORA_RATE_TOKEN", default="20/min")),
    "login_account": env("AGORA_RATE_LOGIN_ACCOUNT", default="10/min"),
    "signup_address": env("AGORA_RATE_SIGNUP_ADDRESS", default="10/hour"),
    "enroll": env("AGORA_RATE_ENROLL", default="30/hour"),  # per address
    "enroll_account": env("AGORA_RATE_ENROLL_ACCOUNT", default="20/hour"),  # per enrollment token's owner
    "claim_address": env("AGORA_RATE_CLAIM_ADDRESS", default="1200/min"),
    "claim_worker": env("AGORA_RATE_CLAIM_WORKER", default="120/min"),
    "comment_address": env("AGORA_RATE_COMMENT_ADDRESS", default="30/min"),
    "comment_account": env("AGORA_RATE_COMMENT_ACCOUNT", default="10/min"),
    "heartbeat": env("AGORA_RATE_HEARTBEAT", default="60/min"),  # per worker
}
for _scope, _rate in AGORA_RATES.items():
    if _rate:
        parse_rate(_rate)

# Repeated failed log-ins lock out (django-axes, in the database): the form and the API token endpoint.
# Staff lift a lockout in the admin (Access attempts) or with `manage.py axes_reset[_username|_ip]`.
AXES_ENABLED = env.bool("AGORA_LOGIN_LOCKOUT", default=True)
AXES_FAILURE_LIMIT = env.int("AGORA_LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.float("AGORA_LOGIN_LOCKOUT_MINUTES", default=15))
# What a lockout is keyed on: "username+ip_address" (default: an attacker cannot lock a member out from
# elsewhere), or e.g. "username+ip_address,ip_address" to also lock an address trying many accounts.
AXES_LOCKOUT_PARAMETERS = [
    item.split("+") for item in env.list("AGORA_LOGIN_LOCKOUT_BY", default=["username+ip_address"])
]
AXES_RESET_ON_SUCCESS = True
AXES_HTTP_RESPONSE_CODE = 429
AXES_CLIENT_IP_CALLABLE = "core.client_ip.client_ip"
AXES_USERNAME_CALLABLE = "agora.accounts.axes_username"
AXES_LOCKOUT_CALLABLE = "agora.accounts.lockout_response"
AXES_VERBOSE = False

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

SESSION_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if env.bool("DJANGO_BEHIND_PROXY", default=False) else None

# --- API --------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticatedOrReadOnly"],
    "DEFAULT_SCHEMA_CLASS": "agora.schema.AutoSchema",
    "DEFAULT_PARSER_CLASSES": [
        "agora.parsers.JSONParser",
        "agora.parsers.FormParser",
        "agora.parsers.MultiPartParser",
    ],
    "DEFAULT_PAGINATION_CLASS": "agora.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "agora.api.exception_handler",
    "DEFAULT_THROTTLE_RATES": AGORA_RATES,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Agora API",
    "DESCRIPTION": "Member API and worker protocol v1 of Agora, a community-governed training platform.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Several models have a `kind` or `status`; give each enum its own name in the schema.
    "ENUM_NAME_OVERRIDES": {
        "ProposalKindEnum": "governance.models.Proposal.Kind",
        "ProposalStatusEnum": "governance.models.Proposal.Status",
        "GuardrailKindEnum": "governance.models.Guardrail.Kind",
        "WorkerStatusEnum": "marketplace.models.Worker.Status",
        "RunStatusEnum": "training.models.TrainingRun.Status",
        "RoundStatusEnum": "training.models.Round.Status",
        "TaskStatusEnum": "training.models.Task.Status",
        "VoteChoiceEnum": "governance.models.Vote.Choice",
    },
}

# --- Agora ------------------------------------------------------------------------------------
# JSON from clients (bodies, upload metrics, update headers) nests at most this many levels.
AGORA_JSON_MAX_DEPTH = env.int("AGORA_JSON_MAX_DEPTH", default=32)
# A JSON, form or multipart request body larger than this is refused (413) before it is read; the worker's
# update upload has its own limit (per task, from the model's size).
AGORA_MAX_BODY_BYTES = env.int("AGORA_MAX_BODY_BYTES", default=1024 * 1024)
# Governance defaults, frozen onto each proposal when it opens.
AGORA_VOTING_PERIOD = timedelta(hours=env.float("AGORA_VOTING_PERIOD_HOURS", default=72))
# The window an author may choose for their proposal (the default above is used when they choose none).
AGORA_VOTING_MIN = timedelta(hours=env.float("AGORA_VOTING_MIN_HOURS", default=1))
AGORA_VOTING_MAX = timedelta(hours=env.float("AGORA_VOTING_MAX_HOURS", default=24 * 14))
if not timedelta(0) < AGORA_VOTING_MIN <= AGORA_VOTING_MAX:
    raise ImproperlyConfigured("AGORA_VOTING_MIN_HOURS must be above 0 and at most AGORA_VOTING_MAX_HOURS")
# A vote closes as soon as the weight not yet cast can no longer change its outcome.
AGORA_EARLY_CLOSE = env.bool("AGORA_EARLY_CLOSE", default=True)
# Quorum (total weight cast, yes+no+abstain) = max(AGORA_QUORUM_MIN, ceil(fraction x eligible voters)), both
# counted when the vote opens.
AGORA_QUORUM_FRACTION = env.float("AGORA_QUORUM_FRACTION", default=0.1)
AGORA_QUORUM_MIN = env.int("AGORA_QUORUM_MIN", default=env.int("AGORA_QUORUM", default=3))
if not 0 <= AGORA_QUORUM_FRACTION <= 1 or AGORA_QUORUM_MIN < 0:
    raise ImproperlyConfigured("AGORA_QUORUM_FRACTION must be within [0, 1] and AGORA_QUORUM_MIN at least 0")
# Who may vote: a verified e-mail address, always, plus these terms (governance/eligibility.py). Terms
# separated by commas must all hold; "a|b" means either: verified_email, account_age:<N>d|h|m (old
# enough when the vote opened), credits:<N> (verified compute credits), staff_approved.
AGORA_VOTER_ELIGIBILITY = env("AGORA_VOTER_ELIGIBILITY", default="verified_email,account_age:7d")
for _term in AGORA_VOTER_ELIGIBILITY.replace("|", ",").split(","):
    if _term.strip() and not re.fullmatch(
        r"verified_email|staff_approved|account_age:\d{1,6}[dhm]|credits:\d{1,12}(\.\d{1,4})?", _term.strip()
    ):
        raise ImproperlyConfigured(f"AGORA_VOTER_ELIGIBILITY: {_term.strip()!r} is not a term")
# Where the credits term reads verified compute credits (governance cannot import marketplace).
AGORA_MEMBER_CREDITS = "marketplace.voting.member_credits"
AGORA_MEMBERS_WITH_CREDITS = "marketplace.voting.members_with_credits"
AGORA_PASS_THRESHOLD = env.float("AGORA_PASS_THRESHOLD", default=0.5)  # yes / (yes + no) must exceed it
# Vote weight strategy: a dotted path to a callable(user) -> Decimal.
AGORA_VOTE_WEIGHT_STRATEGY = env(
    "AGORA_VOTE_WEIGHT_STRATEGY", default="governance.weights.one_member_one_vote"
)
# Workers
AGORA_HEARTBEAT_INTERVAL_S = env.int("AGORA_HEARTBEAT_INTERVAL_S", default=30)
AGORA_OFFLINE_AFTER_S = env.int("AGORA_OFFLINE_AFTER_S", default=100)  # about three missed heartbeats
# A worker whose reliability (a decaying average of valid results, starting at 0.5) falls under this after at
# least AGORA_SUSPEND_AFTER_TASKS recorded results is suspended automatically (0 turns this off).
AGORA_SUSPEND_BELOW_RELIABILITY = env.float("AGORA_SUSPEND_BELOW_RELIABILITY", default=0.2)
AGORA_SUSPEND_AFTER_TASKS = env.int("AGORA_SUSPEND_AFTER_TASKS", default=5)
if not 0 <= AGORA_SUSPEND_BELOW_RELIABILITY <= 1 or AGORA_SUSPEND_AFTER_TASKS < 1:
    raise ImproperlyConfigured("AGORA_SUSPEND_BELOW_RELIABILITY must be within [0, 1] and AGORA_SUSPEND_AFTER_TASKS "
                               "at least 1")
AGORA_ENROLLMENT_TOKEN_TTL = timedelta(hours=env.float("AGORA_ENROLLMENT_TOKEN_TTL_HOURS", default=24))
AGORA_PUBLIC_URL = env("AGORA_PUBLIC_URL", default="http://127.0.0.1:8000")
# Training: where the server evaluates held-out loss after each round (cpu, cuda, or auto).
AGORA_TRAINING_DEVICE = env("AGORA_TRAINING_DEVICE", default="cpu")
# Datasets: file: sources must resolve (symlinks followed) to a regular file under this folder; a
# dataset (file or https download) may be at most this many bytes.
AGORA_DATA_ROOT = Path(env("AGORA_DATA_ROOT", default=str(VAR_DIR / "data")))
AGORA_MAX_DATASET_BYTES = env.int("AGORA_MAX_DATASET_BYTES", default=256 * 1024 * 1024)
# The largest model (parameters) a training spec or an imported model may have.
AGORA_MAX_MODEL_PARAMS = env.int("AGORA_MAX_MODEL_PARAMS", default=2_000_000_000)
# ... and in what precision: auto (bf16 where the device runs it natively, else fp32), fp32, or bf16.
AGORA_EVAL_PRECISION = env("AGORA_EVAL_PRECISION", default="auto")
# The prompt of the text sample the run page shows for each accepted round.
AGORA_SAMPLE_PROMPT = env("AGORA_SAMPLE_PROMPT", default="The ")
# Exported Hugging Face directories (training.export): the most recently downloaded versions kept, and how long
# an unused one stays; the beat's training.sweep_blobs enforces both.
AGORA_EXPORT_CACHE_KEEP = env.int("AGORA_EXPORT_CACHE_KEEP", default=8)
AGORA_EXPORT_CACHE_MAX_AGE_H = env.float("AGORA_EXPORT_CACHE_MAX_AGE_H", default=24.0)
# Contribution checks before each aggregate (diloco.contributions): replays (same sha256, or a count sketch
# with cosine above AGORA_REPLAY_COSINE against an earlier update or public outer step) and updates that do not
# do not learn their own shard better than other data (scored on AGORA_SCORE_WINDOWS windows of it and as many of
# the other shards, against the round's median update on the same windows).
AGORA_SCORE_CONTRIBUTIONS = env.bool("AGORA_SCORE_CONTRIBUTIONS", default=True)
AGORA_SCORE_WINDOWS = env.int("AGORA_SCORE_WINDOWS", default=32)
AGORA_REPLAY_COSINE = env.float("AGORA_REPLAY_COSINE", default=0.99)
if not 1 <= AGORA_SCORE_WINDOWS <= 1024 or not 0 < AGORA_REPLAY_COSINE <= 1:
    raise ImproperlyConfigured("AGORA_SCORE_WINDOWS must be within [1, 1024] and AGORA_REPLAY_COSINE within (0, 1]")
# Spot re-computation (the spec's diloco.replica_fraction): a task and its replica agree when their updates'
# cosine is at least AGORA_REPLICA_COSINE and their norms differ by at most AGORA_REPLICA_NORM_REL (a fraction).
AGORA_REPLICA_COSINE = env.float("AGORA_REPLICA_COSINE", default=0.98)
AGORA_REPLICA_NORM_REL = env.float("AGORA_REPLICA_NORM_REL", default=0.05)
if not -1 <= AGORA_REPLICA_COSINE <= 1 or not 0 <= AGORA_REPLICA_NORM_REL <= 1:
    raise ImproperlyConfigured("AGORA_REPLICA_COSINE must be within [-1, 1] and AGORA_REPLICA_NORM_REL within [0, 1]")
# A round's aggregation holds a lease of this many seconds, renewed every third of it while it works; a
# lapsed lease (a killed Celery worker) is taken over by the next round check or training tick.
AGORA_AGGREGATION_LEASE_S = env.int("AGORA_AGGREGATION_LEASE_S", default=30)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("DJANGO_LOG_LEVEL", default="INFO")},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}
