"""Validation and normalisation of proposal specs (the contract's training and guardrail specs).

Every spec is validated by a DRF serializer; errors are nested the way the spec is, so the API names
the field (``spec.diloco.inner_lr``) and the web form attaches the same message to the same input.
Missing fields get their defaults, so the frozen spec is always complete; unknown fields are refused
so a typo (``inner_Lr``) is not silently dropped.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import posixpath
import re
import socket
import stat
import urllib.parse

import re2
from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import URLValidator
from rest_framework import serializers

from core.fields import FiniteFloatField, StrictIntegerField
from ledger.chain import canonical_json

SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
FIELD_NAME_RE = r"^[^\x00-\x1f]{1,128}$"
# The same values as ``diloco.data.DATASET_FORMATS`` and ``diloco.tokenization``'s BPE bounds (governance
# may not import diloco).
DATASET_FORMATS = ("text", "jsonl", "parquet")
MIN_BPE_VOCAB, MAX_BPE_VOCAB = 260, 65_536
MAX_PATTERNS = 50
MAX_PATTERN_LENGTH = 200
# Guardrail patterns run on RE2 with these options wherever they run (``diloco.guardrails`` is the
# other copy; governance may not import diloco, and a test holds the two to the same verdicts).
RE2_MAX_MEM = 8 << 20
# The chunk sizes a sparse update may use: the same values as ``diloco.codecs.SPARSE_CHUNKS`` (governance may
# not import diloco; a test holds the two equal). Agents before ``sparse_chunk`` always used 4096.
SPARSE_CHUNKS = tuple(2**k for k in range(6, 16))  # 64 ... 32768
SPARSE_CHUNK_BEFORE = 4096
SPARSE_CHUNK_DEFAULT = 4096
SPARSE_CHUNK_MESSAGE = f"sparse_chunk must be one of {', '.join(map(str, SPARSE_CHUNKS))} (a power of two)."
# Host names that only make sense inside someone's network.
LOCAL_HOST_SUFFIXES = (".localhost", ".local", ".internal", ".intranet", ".lan", ".home.arpa", ".localdomain")


def content_hash(spec: dict) -> str:
    """sha256 hex of the spec's canonical JSON (sorted keys, compact separators)."""
    return hashlib.sha256(canonical_json(spec).encode("utf-8")).hexdigest()


class StrictSerializer(serializers.Serializer):
    """Refuses unknown keys and validates omitted nested sections from ``{}`` so their defaults apply."""

    def to_internal_value(self, data):
        if not isinstance(data, dict):
            raise serializers.ValidationError(
                {"non_field_errors": [f"Expected an object, got {type(data).__name__}."]}
            )
        unknown = sorted(set(data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError({key: ["Unknown field."] for key in unknown})
        data = dict(data)
        for name, field in self.fields.items():
            if isinstance(field, serializers.Serializer) and name not in data:
                data[name] = {}
        return super().to_internal_value(data)


# --- training -----------------------------------------------------------------------------------


class ModelConfigSpec(StrictSerializer):
    n_layer = StrictIntegerField(min_value=1, max_value=48, default=2, help_text="Transformer blocks (1–48).")
    n_embd = StrictIntegerField(
        min_value=8, max_value=4096, default=64, help_text="Embedding width (8–4096); divisible by the heads."
    )
    n_head = StrictIntegerField(min_value=1, max_value=64, default=4, help_text="Attention heads (1–64).")
    block_size = StrictIntegerField(
        min_value=8, max_value=4096, default=64, help_text="Context length in bytes (8–4096)."
    )

    def validate(self, attrs):
        if attrs["n_embd"] % attrs["n_head"]:
            raise serializers.ValidationError(
                {"n_embd": [f"Must be divisible by n_head ({attrs['n_head']}); got {attrs['n_embd']}."]}
            )
        return attrs


ARCHES = ("byte-gpt", "llama", "gpt2")
# Where each architecture keeps its context length (the longest sequence it attends over).
CONTEXT_KEYS = {"byte-gpt": "block_size", "llama": "max_position_embeddings", "gpt2": "n_positions"}
DEFAULT_LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "byte-gpt": ["c_attn"]}

# Governance may not import ``diloco`` (see DESIGN.md's arrows); training registers the model zoo's rules
# here in its ``AppConfig.ready``: ``validate(arch, config) -> normalised config`` (ValueError naming the
# key) and ``param_count(arch, config) -> int``.
_model_rules: dict = {}


def register_model_rules(*, validate, param_count) -> None:
    _model_rules["validate"], _model_rules["param_count"] = validate, param_count


class ModelInitField(serializers.ChoiceField):
    """scratch, latest (the model's latest version when the run starts; "current" is its old name, still
    accepted as written), or a version number of the model."""

    def __init__(self, **kwargs):
        super().__init__(choices=["latest", "scratch", "current"], **kwargs)

    def to_internal_value(self, data):
        if isinstance(data, bool):
            self.fail("invalid_choice", input=data)
        if isinstance(data, int) or (isinstance(data, str) and data.strip().isdigit()):
            number = int(data)
            if not 1 <= number <= 10**9:
                raise serializers.ValidationError("A version number is a positive integer.")
            return number
        if isinstance(data, str) and data.strip().lower().startswith("v") and data.strip()[1:].isdigit():
            return int(data.strip()[1:])
        if not isinstance(data, str):
            self.fail("invalid_choice", input=data)
        return super().to_internal_value(data.strip().lower())

    def to_representation(self, value):
        return value


class LoraSpec(StrictSerializer):
    rank = StrictIntegerField(min_value=1, max_value=256, default=8, help_text="Adapter rank r (1–256).")
    alpha = FiniteFloatField(min_value=0.01, max_value=4096.0, default=16.0, help_text="Scale α (update × α/r).")
    dropout = FiniteFloatField(min_value=0.0, max_value=0.5, default=0.0, help_text="Adapter dropout (0–0.5).")
    target_modules = serializers.ListField(
        child=serializers.RegexField(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$", max_length=64), required=False,
        max_length=16, help_text="Module names the adapters wrap (default per arch: llama q_proj, v_proj; "
        "gpt2 c_attn).",
    )


MODEL_CONFIG_HELP = ("The architecture's config. byte-gpt: n_layer, n_embd, n_head, block_size. llama: hidden_size, "
                     "intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, "
                     "max_position_embeddings, vocab_size, … gpt2: n_embd, n_layer, n_head, n_positions, vocab_size.")


class ModelSpec(StrictSerializer):
    name = serializers.CharField(
        default="byte-gpt-small",
        max_length=64,
        help_text="Slug of the community model to train: letters, digits and dashes.",
    )
    arch = serializers.ChoiceField(choices=list(ARCHES), default="byte-gpt", help_text="Architecture.")
    config = serializers.DictField(default=dict, help_text=MODEL_CONFIG_HELP)
    init = ModelInitField(
        default="latest",
        help_text="Start from fresh weights (scratch), the model's latest version when the run starts (latest), "
                  "or one of its versions by number.",
    )
    lora = LoraSpec(required=False, allow_null=True, default=None,
                    help_text="Fine-tune low-rank adapters instead of every weight (needs an existing version).")

    def to_internal_value(self, data):
        # A missing lora means full fine-tuning, not a LoRA with defaults (StrictSerializer fills in {}).
        if isinstance(data, dict) and "lora" not in data:
            data = {**data, "lora": None}
        return super().to_internal_value(data)

    def validate_name(self, value: str) -> str:
        value = value.strip().lower()
        if not SLUG_RE.match(value):
            raise serializers.ValidationError(
                "Use letters, digits and dashes only (no leading or trailing dash), at most 64 characters."
            )
        return value

    def validate(self, attrs):
        arch = attrs["arch"]
        attrs["config"] = _model_config(arch, attrs["config"])
        limit = settings.AGORA_MAX_MODEL_PARAMS
        counter = _model_rules.get("param_count")
        if counter is not None:
            count = counter(arch, attrs["config"])
            if count > limit:
                raise serializers.ValidationError({"config": [
                    f"This {arch} config has {count:,} parameters; this server trains at most {limit:,} "
                    f"(AGORA_MAX_MODEL_PARAMS)."]})
        lora = attrs.get("lora")
        if lora is not None:
            if attrs["init"] == "scratch":
                raise serializers.ValidationError({"lora": [
                    "LoRA fine-tunes an existing version: set init to latest or a version number, not scratch."]})
            lora = dict(lora)
            lora.setdefault("target_modules", DEFAULT_LORA_TARGETS[arch])
            if not lora["target_modules"]:
                raise serializers.ValidationError({"lora": {"target_modules": ["Name at least one module."]}})
            lora["target_modules"] = list(dict.fromkeys(lora["target_modules"]))
            attrs["lora"] = lora
        return attrs


def _model_config(arch: str, config: dict) -> dict:
    """The normalised config for ``arch``, or a ValidationError under ``config`` naming the key."""
    if arch == "byte-gpt":
        serializer = ModelConfigSpec(data=config)
        if not serializer.is_valid():
            raise serializers.ValidationError({"config": serializer.errors})
        return dict(serializer.validated_data)
    validate = _model_rules.get("validate")
    if validate is None:
        raise serializers.ValidationError({"arch": [f"This server cannot build {arch} models."]})
    try:
        return _plain(validate(arch, config))
    except LookupError as exc:
        raise serializers.ValidationError({"arch": [str(exc)]}) from None
    except (ValueError, TypeError) as exc:
        message = str(exc)
        words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", message)
        key = next((w for w in words if w in config), None) or next(
            (w for w in words if w == CONTEXT_KEYS.get(arch) or ("_" in w and w.islower())), None)
        raise serializers.ValidationError({"config": {key: [message]} if key else [message]}) from None


def model_context(arch: str, config: dict) -> int | None:
    """The longest sequence the model attends over."""
    value = config.get(CONTEXT_KEYS.get(arch, ""))
    return int(value) if isinstance(value, int) else None


class DatasetSpec(StrictSerializer):
    source = serializers.CharField(
        default="builtin:python-docs",
        max_length=2000,
        help_text="builtin:python-docs, file:/absolute/path (a file under the server's data root), or an "
        "https:// URL on a public host (pinned by sha256).",
    )
    sha256 = serializers.CharField(
        default=None, allow_null=True, allow_blank=True, help_text="64 hex digits; required for https sources."
    )
    heldout_fraction = FiniteFloatField(
        min_value=0.01, max_value=0.5, default=0.1, help_text="Share of documents kept for evaluation (0.01–0.5)."
    )
    format = serializers.ChoiceField(
        choices=list(DATASET_FORMATS), default="text",
        help_text="text (documents separated by blank lines), jsonl (one JSON object per line; the text is in "
                  "`field`) or parquet (the text is in `column`).",
    )
    field = serializers.RegexField(
        FIELD_NAME_RE, max_length=128, default=None, allow_null=True,
        help_text="jsonl only: the string field of each line that holds a document.",
    )
    column = serializers.RegexField(
        FIELD_NAME_RE, max_length=128, default=None, allow_null=True,
        help_text="parquet only: the string column that holds the documents.",
    )

    def validate_source(self, value: str) -> str:
        value = value.strip()
        if value.startswith("builtin:"):
            if value != "builtin:python-docs":
                raise serializers.ValidationError("The only built-in corpus is builtin:python-docs.")
            return value
        if value.startswith("file:"):
            return "file:" + _file_source_path(value[len("file:"):])
        if value[:8].lower() == "https://":
            _check_https_source(value)
            return value
        raise serializers.ValidationError(
            "Must be builtin:python-docs, file:<absolute path> or an https:// URL (http and other schemes are "
            "refused)."
        )

    def validate_sha256(self, value):
        if value is None or not value.strip():
            return None
        value = value.strip().lower()
        if not SHA256_RE.match(value):
            raise serializers.ValidationError("Must be 64 hexadecimal digits.")
        return value

    def validate(self, attrs):
        if attrs["source"].startswith("https://") and not attrs.get("sha256"):
            raise serializers.ValidationError({"sha256": ["Required for https sources, so the data is pinned."]})
        fmt, errors = attrs["format"], {}
        if fmt != "text" and attrs["source"].startswith("builtin:"):
            errors["format"] = [f"{attrs['source']} is text; a {fmt} dataset comes from a file or an https URL."]
        for name, needed_by in (("field", "jsonl"), ("column", "parquet")):
            if fmt == needed_by and not attrs.get(name):
                errors[name] = [f"Required when format is {needed_by}: name the {name} that holds the text."]
            elif fmt != needed_by and attrs.get(name):
                errors[name] = [f"Only used when format is {needed_by}."]
        if errors:
            raise serializers.ValidationError(errors)
        return attrs


def _file_source_path(path: str) -> str:
    """The normalised path of a file source that names a regular file under the server's data root.

    The agents check the same against their own data root when they read it.
    """
    if not path.startswith("/"):
        raise serializers.ValidationError("A file source needs an absolute path: file:/path/to/corpus.txt.")
    normalised = posixpath.normpath(path)
    if normalised in ("/", "."):
        raise serializers.ValidationError("A file source must name a file.")
    root = os.path.realpath(settings.AGORA_DATA_ROOT)
    real = os.path.realpath(normalised)  # symlinks and .. resolved
    if not real.startswith(root.rstrip(os.sep) + os.sep):
        raise serializers.ValidationError(f"A file source must be a file under the server's data root {root}.")
    try:
        info = os.stat(real)
    except OSError:
        raise serializers.ValidationError(f"There is no file {normalised} under the data root.") from None
    if not stat.S_ISREG(info.st_mode):
        raise serializers.ValidationError("A file source must be a regular file.")
    limit = settings.AGORA_MAX_DATASET_BYTES
    if info.st_size > limit:
        raise serializers.ValidationError(f"The file has {info.st_size} bytes; the limit is {limit}.")
    return normalised


def address_is_public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """The same rule as ``diloco.data.address_is_public`` (which the fetch applies to resolved addresses)."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id or addr.ipv4_mapped or addr.sixtofour or addr.teredo:
            return False
        if addr in ipaddress.ip_network("64:ff9b::/96") or addr in ipaddress.ip_network("64:ff9b:1::/48"):
            return False
    return (addr.is_global and not addr.is_multicast and not addr.is_private and not addr.is_loopback
            and not addr.is_link_local and not addr.is_reserved and not addr.is_unspecified)


def _literal_address(host: str):
    """The IP address a host literally is (IPv6, dotted quad, or a legacy form like 2130706433), or None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if all(part and part.isalnum() for part in host.split(".")):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))  # what the resolver would make of it
        except OSError:
            return None
    return None


def _check_https_source(value: str) -> None:
    """Syntax and literal-address checks only: a host name is resolved (and checked again) when it is fetched."""
    try:
        URLValidator(schemes=["https"])(value)
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 (raises on a bad port)
    except (DjangoValidationError, ValueError):
        raise serializers.ValidationError("Not a valid https URL.") from None
    if parts.username is not None or parts.password is not None:
        raise serializers.ValidationError("No user name or password in the URL (the spec is public).")
    host = (parts.hostname or "").rstrip(".")
    address = _literal_address(host)
    if address is not None:
        if not address_is_public(address):
            raise serializers.ValidationError(
                f"{address} is not a public address; datasets are fetched only from the public internet.")
    elif host == "localhost" or "." not in host or host.endswith(LOCAL_HOST_SUFFIXES):
        raise serializers.ValidationError(
            f"{host} is not a public host name; datasets are fetched only from the public internet.")


class DilocoSpec(StrictSerializer):
    rounds = StrictIntegerField(min_value=1, max_value=1000, default=3, help_text="Outer rounds T (1–1000).")
    # The defaults make the default aggregator robust: a trimmed mean of 4 drops the largest and smallest
    # value of every coordinate, so one poisoned update of four cannot steer it.
    workers_per_round = StrictIntegerField(
        min_value=1, max_value=256, default=4, help_text="Workers k asked to train in each round (1–256)."
    )
    min_workers = StrictIntegerField(
        min_value=1, max_value=256, default=3,
        help_text="Results needed to aggregate when the round deadline passes (≤ workers per round).",
    )
    inner_steps = StrictIntegerField(
        min_value=1, max_value=100_000, default=20, help_text="Inner AdamW steps H per round (1–100000)."
    )
    inner_lr = FiniteFloatField(
        min_value=1e-7, max_value=1.0, default=0.0004, help_text="Inner learning rate (1e-7–1)."
    )
    batch_size = StrictIntegerField(min_value=1, max_value=1024, default=8, help_text="Sequences per step (1–1024).")
    seq_len = StrictIntegerField(
        min_value=8, max_value=4096, default=64, help_text="Sequence length in bytes (8–4096; ≤ block size)."
    )
    weight_decay = FiniteFloatField(min_value=0.0, max_value=1.0, default=0.1, help_text="AdamW weight decay (0–1).")
    warmup = StrictIntegerField(
        min_value=0, max_value=100_000, default=5, help_text="Linear warm-up steps (≤ inner steps)."
    )
    grad_clip = FiniteFloatField(
        min_value=0.0, max_value=100.0, default=1.0, help_text="Gradient norm clip (0 disables; ≤ 100)."
    )
    outer_lr = FiniteFloatField(
        min_value=0.01, max_value=4.0, default=0.7,
        help_text="Outer SGD learning rate (0.01–4; default 0.7, or 2 with a sparse compression). Sparse "
                  "compressions step on a mean of mostly disjoint sparse updates and want a larger one: in "
                  "bench.fidelity_sparse 2 beat 1 by 13% and 0.7 by far more.",
    )
    outer_momentum = FiniteFloatField(
        min_value=0.0, max_value=0.99, default=0.9,
        help_text="Outer Nesterov momentum (0–0.99; default 0.9, or 0.95 with a sparse compression). With a sparse "
                  "compression (topk2, topk4) it is the decay β of each worker's error feedback, which takes the "
                  "place of outer momentum (SparseLoCo), and the server steps with plain SGD on the mean of the "
                  "sparse updates.",
    )
    compression = serializers.ChoiceField(
        choices=["fp32", "fp16", "int8", "topk2", "topk4"], default="int8",
        help_text="How pseudo-gradients travel: fp32, fp16 or int8 (dense), or topk2 / topk4 (sparse: each worker "
                  "sends the largest `density` share of every chunk of `sparse_chunk` values in 2 or 4 bits, keeps "
                  "the rest for later rounds, and downloads only each round's step).",
    )
    density = FiniteFloatField(
        min_value=0.005, max_value=0.1, default=0.02,
        help_text="Sparse compression: share of each chunk of `sparse_chunk` values a worker sends per round "
                  "(0.005–0.1; SparseLoCo uses 0.01–0.03). Not used by dense compressions.",
    )
    sparse_chunk = StrictIntegerField(
        min_value=SPARSE_CHUNKS[0], max_value=SPARSE_CHUNKS[-1], default=SPARSE_CHUNK_BEFORE,
        error_messages={"min_value": SPARSE_CHUNK_MESSAGE, "max_value": SPARSE_CHUNK_MESSAGE},
        help_text=f"Sparse compression: the chunk a worker's update is cut into; it keeps the largest `density` "
                  f"share of each chunk (a power of two, {SPARSE_CHUNKS[0]}–{SPARSE_CHUNKS[-1]}; default "
                  f"{SPARSE_CHUNK_DEFAULT}). A larger chunk lets a worker spend its share where the pseudo-gradient "
                  f"is large rather than evenly, but at the same share it did not help in bench.fidelity_sparse "
                  f"(4 workers, 2%, 3000 steps: held-out loss 1.5159 with 32768 against 1.5102 with 4096 at 137k "
                  f"parameters, H=25 at 470k 1.2208 against 1.2165). Not used by dense compressions.",
    )
    overlap = serializers.BooleanField(
        default=False,
        help_text="Overlap: an agent trains ahead from the weights it has while its upload travels and the round "
                  "is aggregated, then moves those steps onto the new checkpoint (one-step-delayed progress, as in "
                  "Streaming DiLoCo and DiLoCoX); its update is still measured from the task's checkpoint.",
    )
    aggregator = serializers.ChoiceField(
        choices=["mean", "trimmed_mean", "median", "norm_clipped_mean"],
        default="trimmed_mean",
        help_text="How the round's updates are combined; robust ones resist poisoned updates.",
    )
    trim_fraction = FiniteFloatField(
        min_value=0.0, max_value=0.49, default=0.25,
        help_text="Trimmed mean: share of the largest and of the smallest values dropped per coordinate "
                  "(0–0.49; workers per round × trim must be at least 1).",
    )
    round_timeout_s = StrictIntegerField(
        min_value=30, max_value=86_400, default=600, help_text="Round deadline in seconds (30–86400)."
    )
    max_round_extensions = StrictIntegerField(
        min_value=0, max_value=100, default=3,
        help_text="Times a round's deadline is extended while it has fewer than min_workers results before "
                  "that attempt of the round fails (0–100).",
    )
    max_failed_rounds = StrictIntegerField(
        min_value=0, max_value=100, default=2,
        help_text="Failed round attempts the run survives (each failed round is tried again); one more fails "
                  "the run (0–100).",
    )
    replica_fraction = FiniteFloatField(
        min_value=0.0, max_value=0.5, default=0.1,
        help_text="Spot re-computation: the chance that a round's task is also given to a second worker with the "
                  "same checkpoint, shard and seed; the two updates must agree or the one the round's checks "
                  "favour is kept and the other earns nothing (0–0.5; 0 turns it off).",
    )

    def to_internal_value(self, data):
        """The fields' values, where a sparse compression changes the defaults of the keys it was not given
        (see :data:`SPARSE_DEFAULTS`): a run that asks only for topk2 gets the settings measured for it, not the
        dense ones, and the stored spec shows them."""
        attrs = super().to_internal_value(data)
        if attrs.get("compression") in SPARSE_COMPRESSIONS:
            given = set(data)  # StrictSerializer took only an object
            for key, value in sparse_defaults(attrs["workers_per_round"]).items():
                if key not in given:
                    attrs[key] = value
        return attrs

    def validate_sparse_chunk(self, value: int) -> int:
        if value not in SPARSE_CHUNKS:
            raise serializers.ValidationError(SPARSE_CHUNK_MESSAGE)
        return value

    def validate(self, attrs):
        errors = {}
        if attrs["min_workers"] > attrs["workers_per_round"]:
            errors["min_workers"] = [
                f"Must not exceed workers_per_round ({attrs['workers_per_round']}); got {attrs['min_workers']}."
            ]
        if attrs["warmup"] > attrs["inner_steps"]:
            errors["warmup"] = [f"Must not exceed inner_steps ({attrs['inner_steps']}); got {attrs['warmup']}."]
        errors.update(_robustness_errors(attrs))
        if attrs["compression"] in SPARSE_COMPRESSIONS and attrs["aggregator"] in ("trimmed_mean", "median"):
            errors["aggregator"] = [
                f"With the sparse compression {attrs['compression']} most values are zero in all but one update, "
                f"so a per-value {attrs['aggregator']} throws most of the signal away. Choose \"norm_clipped_mean\" "
                "(each update's influence capped; screening still applies) or \"mean\"."
            ]
        if errors:
            raise serializers.ValidationError(errors)
        return attrs


SPARSE_COMPRESSIONS = ("topk2", "topk4")


def sparse_defaults(workers_per_round: int) -> dict:
    """The defaults of a sparse run's keys that differ from a dense run's (``python -m bench.fidelity_sparse``,
    137k-parameter model, k=4, H=50, 3000 steps: outer lr 2 with β 0.95 reached 1.487 where the dense defaults,
    outer lr 0.7 with β 0.9, stayed far behind). A per-value trimmed mean or median throws away the values
    only one worker sent, so the aggregator is the norm-clipped mean (the plain mean below three workers).
    The chunk stays 4096: at the same share, 32768 did no better (see the field's help)."""
    return {"outer_lr": 2.0, "outer_momentum": 0.95,
            "aggregator": "norm_clipped_mean" if workers_per_round >= ROBUST_MIN_WORKERS["norm_clipped_mean"]
            else "mean",
            "sparse_chunk": SPARSE_CHUNK_DEFAULT}

# Below these a "robust" aggregator is not: a trimmed mean that trims nothing is the mean, and the median
# of two values is their mean. Three is the least k where one poisoned update is outvoted.
ROBUST_MIN_WORKERS = {"median": 3, "norm_clipped_mean": 3}


def _robustness_errors(attrs) -> dict:
    """Field errors for a robust aggregator asked with too few workers per round to be robust."""
    method, k = attrs["aggregator"], attrs["workers_per_round"]
    if method == "trimmed_mean":
        trim = attrs.get("trim_fraction", 0.25)
        if math.floor(k * trim) < 1:
            least = math.ceil(1 / trim) if trim > 0 else None
            message = (f"A trimmed mean needs workers_per_round × trim_fraction ≥ 1 to trim anything; "
                       f"{k} × {trim:g} trims nothing, which is the plain mean. "
                       + (f"Ask at least {least} workers per round, raise trim_fraction, or choose \"mean\"."
                          if least and least <= 256 else "Raise trim_fraction, or choose \"mean\"."))
            return {"aggregator": [message], "workers_per_round": [message]}
    least = ROBUST_MIN_WORKERS.get(method)
    if least and k < least:
        message = (f"The {method} aggregator needs at least {least} workers per round to resist a poisoned "
                   f"update; got {k}. Ask more workers, or choose \"mean\".")
        return {"aggregator": [message], "workers_per_round": [message]}
    return {}


class HardwareSpec(StrictSerializer):
    min_vram_mb = StrictIntegerField(
        min_value=0, max_value=1_048_576, default=0, help_text="Least GPU memory a worker needs, in MB (0 = any)."
    )
    allow_cpu = serializers.BooleanField(default=True, help_text="Let CPU-only workers take part (small runs).")


class TokenizerSpec(StrictSerializer):
    kind = serializers.ChoiceField(
        choices=["byte", "bpe", "model"], default="byte",
        help_text="byte (UTF-8 bytes, 256 ids), bpe (a byte-level BPE trained on the run's training split) or "
                  "model (the tokenizer imported with the model).",
    )
    vocab_size = StrictIntegerField(
        min_value=MIN_BPE_VOCAB, max_value=MAX_BPE_VOCAB, default=None, allow_null=True,
        help_text=f"bpe only: vocabulary size to train ({MIN_BPE_VOCAB}–{MAX_BPE_VOCAB}).",
    )

    def validate(self, attrs):
        if attrs["kind"] == "bpe" and attrs.get("vocab_size") is None:
            raise serializers.ValidationError({"vocab_size": ["Required when kind is bpe."]})
        if attrs["kind"] != "bpe" and attrs.get("vocab_size") is not None:
            size = "256 ids" if attrs["kind"] == "byte" else "the imported tokenizer's vocabulary"
            raise serializers.ValidationError({"vocab_size": [
                f"Only used when kind is bpe (the {attrs['kind']} tokenizer has {size})."]})
        return attrs


def _tokenizer_errors(arch: str, config: dict, tokenizer: dict) -> dict:
    """A tokenizer the model cannot read: byte-gpt reads bytes only; a model's vocabulary must hold every id."""
    kind = tokenizer["kind"]
    if arch == "byte-gpt":
        if kind != "byte":
            return {"kind": [f"byte-gpt reads bytes (256 ids); a {kind} tokenizer needs a llama or gpt2 model."]}
        return {}
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int):
        return {}
    need = 256 if kind == "byte" else tokenizer.get("vocab_size")
    if need is not None and vocab < need:
        return {"vocab_size": [f"The model's config has vocab_size {vocab}, fewer than the tokenizer's {need} ids."]}
    return {}


class TrainingSpec(StrictSerializer):
    model = ModelSpec(required=False)
    dataset = DatasetSpec(required=False)
    tokenizer = TokenizerSpec(required=False)
    diloco = DilocoSpec(required=False)
    hardware = HardwareSpec(required=False)

    def validate(self, attrs):
        model = attrs["model"]
        context = model_context(model["arch"], model["config"])
        if context is not None and attrs["diloco"]["seq_len"] > context:
            key = CONTEXT_KEYS[model["arch"]]
            raise serializers.ValidationError(
                {"diloco": {"seq_len": [f"Must not exceed model.config.{key} ({context})."]}}
            )
        errors = _tokenizer_errors(model["arch"], model["config"], attrs["tokenizer"])
        if errors:
            raise serializers.ValidationError({"tokenizer": errors})
        return attrs


# --- guardrail ----------------------------------------------------------------------------------


def re2_options() -> re2.Options:
    options = re2.Options()
    options.case_sensitive = False
    options.max_mem = RE2_MAX_MEM
    options.never_capture = True
    options.log_errors = False
    return options


def _re2_message(exc: Exception) -> str:
    message = exc.args[0] if exc.args else exc
    return message.decode("utf-8", errors="replace") if isinstance(message, bytes) else str(message)


class GuardrailSpec(StrictSerializer):
    action = serializers.ChoiceField(
        choices=["adopt", "retire"], default="adopt", help_text="Adopt a new guardrail or retire one in force."
    )
    kind = serializers.ChoiceField(
        choices=["data_filter", "output_filter"],
        required=False,
        help_text="data_filter drops training documents that match; output_filter blocks matching model output.",
    )
    patterns = serializers.ListField(
        child=serializers.CharField(allow_blank=True, trim_whitespace=True),
        required=False,
        help_text=f"RE2 regular expressions (linear time: no backreferences or lookaround), matched "
        f"case-insensitively; 1–{MAX_PATTERNS}, each at most {MAX_PATTERN_LENGTH} characters.",
    )
    guardrail_id = StrictIntegerField(min_value=1, required=False, help_text="The guardrail to retire.")
    description = serializers.CharField(
        default="", allow_blank=True, max_length=2000, help_text="What the guardrail is for, in plain words."
    )

    def validate_patterns(self, value: list[str]) -> list[str]:
        if not value:
            raise serializers.ValidationError("Give at least one pattern.")
        if len(value) > MAX_PATTERNS:
            raise serializers.ValidationError(f"At most {MAX_PATTERNS} patterns; got {len(value)}.")
        errors: dict[int, list[str]] = {}
        for index, pattern in enumerate(value):
            if not pattern:
                errors[index] = ["Empty pattern (it would match everything)."]
            elif len(pattern) > MAX_PATTERN_LENGTH:
                errors[index] = [f"At most {MAX_PATTERN_LENGTH} characters; got {len(pattern)}."]
            else:
                try:
                    re2.compile(pattern, re2_options())
                except re2.error as exc:
                    errors[index] = [
                        f"Not a valid regular expression for the linear-time RE2 engine: {_re2_message(exc)}."]
        if errors:
            raise serializers.ValidationError(errors)
        value = list(dict.fromkeys(value))  # drop duplicates, keep order
        try:  # the patterns run as one program; each may fit the memory bound while all together do not
            re2.compile("|".join(f"(?:{p})" for p in value), re2_options())
        except re2.error as exc:
            raise serializers.ValidationError(
                f"The patterns together are too large for the RE2 engine: {_re2_message(exc)}.") from None
        return value

    def validate(self, attrs):
        action = attrs["action"]
        if action == "adopt":
            errors = {
                name: [f"This field is required when action is {action}."]
                for name in ("kind", "patterns")
                if name not in attrs
            }
            if "guardrail_id" in attrs:
                errors["guardrail_id"] = ["Only used when action is retire."]
            if errors:
                raise serializers.ValidationError(errors)
            return {
                "action": action,
                "kind": attrs["kind"],
                "patterns": attrs["patterns"],
                "description": attrs["description"].strip(),
            }
        errors = {}
        if "guardrail_id" not in attrs:
            errors["guardrail_id"] = ["This field is required when action is retire."]
        for name in ("kind", "patterns"):
            if name in attrs:
                errors[name] = ["Only used when action is adopt."]
        if errors:
            raise serializers.ValidationError(errors)
        return {"action": action, "guardrail_id": attrs["guardrail_id"], "description": attrs["description"].strip()}


SPEC_SERIALIZERS = {"training": TrainingSpec, "guardrail": GuardrailSpec}


def _plain(value):
    """OrderedDicts and ReturnDicts out, plain JSON values in."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def spec_normalise(*, kind: str, spec) -> dict:
    """The validated, complete spec, or a DRF ``ValidationError`` nested under ``spec``."""
    serializer_class = SPEC_SERIALIZERS.get(kind)
    if serializer_class is None:
        raise serializers.ValidationError({"kind": [f"Unknown kind {kind!r}."]})
    serializer = serializer_class(data=spec)
    if not serializer.is_valid():
        raise serializers.ValidationError({"spec": serializer.errors})
    return _plain(serializer.validated_data)


def default_spec(kind: str) -> dict:
    if kind == "training":
        return spec_normalise(kind=kind, spec={})
    return {"action": "adopt", "kind": "data_filter", "patterns": [], "description": ""}
