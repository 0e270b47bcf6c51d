"""Web forms for proposals. They collect the spec field by field but validate through the same spec
serializers as the API (via the service), so the messages are identical and land on the right input."""

from __future__ import annotations

import json
import re

from django import forms
from django.conf import settings
from rest_framework import serializers

from governance.models import Guardrail, Proposal
from governance.specs import (
    SPARSE_COMPRESSIONS,
    DatasetSpec,
    DilocoSpec,
    GuardrailSpec,
    HardwareSpec,
    LoraSpec,
    ModelConfigSpec,
    ModelSpec,
    TokenizerSpec,
    sparse_defaults,
    spec_normalise,
)

# DiLoCo settings set through the API only (no input; editing a draft keeps them, see ``draft_extras``).
API_ONLY_DILOCO = frozenset({"sparse_chunk"})
DILOCO_INPUTS = [name for name in DilocoSpec().fields if name not in API_ONLY_DILOCO]
SPARSE_DEFAULT_FIELDS = frozenset(sparse_defaults(4)) - API_ONLY_DILOCO  # form fields named as their spec keys

# form field name -> (path inside the spec, serializer class that documents it)
TRAINING_FIELDS: dict[str, tuple[str, type]] = {
    "model_name": ("model.name", ModelSpec),
    "model_init": ("model.init", ModelSpec),
    "arch": ("model.arch", ModelSpec),
    "lora_rank": ("model.lora.rank", LoraSpec),
    "lora_alpha": ("model.lora.alpha", LoraSpec),
    "n_layer": ("model.config.n_layer", ModelConfigSpec),
    "n_embd": ("model.config.n_embd", ModelConfigSpec),
    "n_head": ("model.config.n_head", ModelConfigSpec),
    "block_size": ("model.config.block_size", ModelConfigSpec),
    **{name: (f"model.config.{name}", None) for name in (
        "n_positions", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "vocab_size")},
    "tokenizer_kind": ("tokenizer.kind", TokenizerSpec),
    "tokenizer_vocab_size": ("tokenizer.vocab_size", TokenizerSpec),
    "dataset_source": ("dataset.source", DatasetSpec),
    "dataset_sha256": ("dataset.sha256", DatasetSpec),
    "heldout_fraction": ("dataset.heldout_fraction", DatasetSpec),
    "dataset_format": ("dataset.format", DatasetSpec),
    "dataset_field": ("dataset.field", DatasetSpec),
    "dataset_column": ("dataset.column", DatasetSpec),
    **{name: (f"diloco.{name}", DilocoSpec) for name in DILOCO_INPUTS},
    "min_vram_mb": ("hardware.min_vram_mb", HardwareSpec),
    "allow_cpu": ("hardware.allow_cpu", HardwareSpec),
}
# Which architectures read each model.config input; the spec carries only the chosen architecture's keys.
CONFIG_ARCHES: dict[str, tuple[str, ...]] = {
    "n_layer": ("byte-gpt", "gpt2"), "n_embd": ("byte-gpt", "gpt2"), "n_head": ("byte-gpt", "gpt2"),
    "block_size": ("byte-gpt",), "n_positions": ("gpt2",), "vocab_size": ("llama", "gpt2"),
    **{name: ("llama",) for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings")},
}
# Help for the Hugging Face config keys, which no serializer field documents: the model zoo checks them (its
# bounds are in the error it raises, named by the key, the same message the API gives). Empty: its default.
HF_CONFIG_HELP = {
    "n_positions": "GPT-2: context length in tokens. Empty: 256.",
    "hidden_size": "Llama: model width, divisible by the attention heads. Empty: 64.",
    "intermediate_size": "Llama: width of each MLP. Empty: 176.",
    "num_hidden_layers": "Llama: decoder layers. Empty: 2.",
    "num_attention_heads": "Llama: attention heads. Empty: 4.",
    "num_key_value_heads": "Llama: key/value heads (grouped-query attention); must divide the attention heads. "
                           "Empty: as many as the attention heads.",
    "max_position_embeddings": "Llama: context length in tokens. Empty: 256.",
    "vocab_size": "Llama and GPT-2: token ids the model has, at least the tokenizer's (256 for bytes, the BPE "
                  "vocabulary size for bpe). Empty: 256.",
}
TRAINING_GROUPS = [
    ("Model", "Which community model this run trains, its architecture, and whether it trains every weight or "
              "low-rank (LoRA) adapters.",
     ["model_name", "model_init", "arch", "lora_rank", "lora_alpha"]),
    ("Shape: byte-gpt and GPT-2", "Read when the architecture is byte-gpt or gpt2; a Llama ignores them.",
     ["n_layer", "n_embd", "n_head", "block_size", "n_positions"]),
    ("Shape: Llama", "Read when the architecture is llama (a Hugging Face Llama config); the others ignore them.",
     ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
      "max_position_embeddings"]),
    ("Tokenizer", "How text becomes token ids. byte-gpt reads bytes; a Llama or GPT-2 can also read a byte-level "
                  "BPE trained on the run's training split, or the tokenizer imported with the model.",
     ["tokenizer_kind", "tokenizer_vocab_size", "vocab_size"]),
    ("Data", "The corpus the workers train on; a slice is held out to evaluate every round.",
     ["dataset_source", "dataset_sha256", "heldout_fraction", "dataset_format", "dataset_field", "dataset_column"]),
    ("DiLoCo", "Each round, every worker runs H inner AdamW steps on its shard and sends back one compressed "
               "pseudo-gradient; the server combines them and takes an outer Nesterov step.",
     DILOCO_INPUTS),
    ("Hardware", "Who can take part.", ["min_vram_mb", "allow_cpu"]),
]
GUARDRAIL_FIELDS: dict[str, str] = {
    "action": "action", "kind": "kind", "patterns": "patterns", "guardrail_id": "guardrail_id",
    "description": "description",
}
CHOICE_FIELDS = {"model_init", "compression", "aggregator", "dataset_format", "arch", "tokenizer_kind"}
FLOAT_FIELDS = {"heldout_fraction", "inner_lr", "weight_decay", "grad_clip", "outer_lr", "outer_momentum",
                "lora_alpha"}
INTEGER_RE = re.compile(r"[+-]?\d+")
RENDERED_PATHS = frozenset(path for path, _ in TRAINING_FIELDS.values())
_MISSING = object()


def _spec_field(path: str, serializer_class: type):
    return serializer_class().fields[path.rsplit(".", 1)[-1]]


# Labels people read; a field missing here falls back to its name in words.
LABELS = {
    "model_name": "Model", "model_init": "Start from", "n_layer": "Layers", "n_embd": "Embedding width",
    "n_head": "Attention heads", "block_size": "Context length (tokens)", "dataset_source": "Data source",
    "dataset_sha256": "Data SHA-256", "heldout_fraction": "Held-out share", "dataset_format": "Data format",
    "dataset_field": "JSONL field", "dataset_column": "Parquet column", "rounds": "Outer rounds (T)",
    "workers_per_round": "Workers per round (k)", "min_workers": "Least results to aggregate",
    "inner_steps": "Inner steps per round (H)", "inner_lr": "Inner learning rate", "batch_size": "Batch size",
    "seq_len": "Sequence length (tokens)", "weight_decay": "Weight decay", "warmup": "Warm-up steps",
    "grad_clip": "Gradient clip", "outer_lr": "Outer learning rate", "outer_momentum": "Outer momentum",
    "compression": "Update compression", "aggregator": "Aggregator", "trim_fraction": "Trimmed share",
    "round_timeout_s": "Round deadline (seconds)", "max_round_extensions": "Deadline extensions per round",
    "max_failed_rounds": "Failed rounds survived", "replica_fraction": "Re-computed share of tasks",
    "density": "Sparse density", "overlap": "Overlap rounds", "min_vram_mb": "Least GPU memory (MB)",
    "allow_cpu": "Allow CPU workers", "arch": "Architecture", "lora_rank": "LoRA rank",
    "lora_alpha": "LoRA scale (alpha)", "n_positions": "Context length (GPT-2)", "hidden_size": "Hidden width",
    "intermediate_size": "MLP width", "num_hidden_layers": "Decoder layers",
    "num_attention_heads": "Attention heads (Llama)", "num_key_value_heads": "Key/value heads",
    "max_position_embeddings": "Context length (Llama)", "vocab_size": "Model vocabulary size",
    "tokenizer_kind": "Tokenizer", "tokenizer_vocab_size": "BPE vocabulary size",
}


def _label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    return name.replace("model_", "model ").replace("dataset_", "dataset ").replace("_", " ").capitalize()


def _set_path(spec: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        spec = spec.setdefault(key, {})
    spec[leaf] = value


class ProposalBaseForm(forms.Form):
    title = forms.CharField(max_length=200, help_text="A short summary people will see in the list.")
    body = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 6}),
        help_text="Why the community should want this. Markdown: **bold**, lists, links, code blocks.",
    )
    voting_hours = forms.FloatField(
        required=False,
        label="Voting window (hours)",
        help_text="How long the vote stays open. Empty: the default.",
    )
    open_now = forms.BooleanField(
        required=False,
        initial=True,
        label="Open the vote now",
        help_text="Untick to save a draft you can still cancel and open later. Once open, the window, quorum "
        "and threshold in force are frozen onto the proposal.",
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        low, high = settings.AGORA_VOTING_MIN, settings.AGORA_VOTING_MAX
        default = settings.AGORA_VOTING_PERIOD
        self.fields["voting_hours"].help_text = (
            f"How long the vote stays open, from {_hours(low)} to {_hours(high)} hours. "
            f"Empty: {_hours(default)} hours."
        )
        self.fields["voting_hours"].widget.attrs.update(
            min=_hours(low), max=_hours(high), step="any", placeholder=_hours(default)
        )

    def add_spec_errors(self, errors: dict) -> None:
        """Attach a DRF error dict (``{"spec": {...}, "title": [...]}``) to the matching inputs."""
        for name, messages in _flatten(errors).items():
            field = self.field_for_error(name)
            for message in messages:
                if field and field in self.fields:
                    self.add_error(field, message)
                else:
                    self.add_error(None, f"{name}: {message}")

    def field_for_error(self, name: str) -> str | None:
        if name in ("title", "body", "voting_hours"):
            return name
        return None


def _hours(period) -> str:
    return f"{period.total_seconds() / 3600:g}"


def _get_path(spec: dict, path: str, missing=None):
    """The value at a dotted ``path``, or ``missing`` where the spec has no such key."""
    for key in path.split("."):
        if not isinstance(spec, dict) or key not in spec:
            return missing
        spec = spec[key]
    return spec


def _leaves(spec: dict, prefix: str = "") -> dict:
    """Every leaf of a nested spec by dotted path; a list, a null or an empty section is a leaf."""
    out: dict = {}
    for key, value in spec.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(_leaves(value, path))
        else:
            out[path] = value
    return out


def _rendered(path: str) -> bool:
    """Whether the training form decides this path: it has an input for it, or for something under it (the form
    decides whether ``model.lora`` exists at all)."""
    return path in RENDERED_PATHS or any(shown.startswith(f"{path}.") for shown in RENDERED_PATHS)


def draft_extras(spec: dict) -> dict:
    """The settings of a stored training spec that the form has no input for and that differ from what the
    serializer fills in when the form alone saves the draft unchanged: the ones the member chose (through the
    API). Defaults and values derived from shown inputs (a Llama's head_dim from its width and heads) are left
    out, so they follow those inputs again. If the shown part alone no longer validates (a shown value only
    works with a hidden one), every hidden setting counts as chosen: keeping too much is safe, losing is not."""
    hidden = {path: value for path, value in _leaves(spec).items() if not _rendered(path)}
    if not hidden:
        return {}
    shown: dict = {}
    for path in RENDERED_PATHS:
        value = _get_path(spec, path)
        if value is not None:
            _set_path(shown, path, value)
    try:
        baseline = spec_normalise(kind="training", spec=shown)
    except serializers.ValidationError:
        return dict(sorted(hidden.items()))
    return {path: value for path, value in sorted(hidden.items()) if _get_path(baseline, path, _MISSING) != value}


def _config_keys(arch: str) -> set[str]:
    """The model.config keys the server accepts for ``arch`` (the model zoo's, through the spec serializer)."""
    try:
        spec = spec_normalise(kind="training", spec={"model": {"arch": arch, "init": "scratch"}})
    except serializers.ValidationError:
        return set()
    return set(spec["model"]["config"])


def setting_text(path: str, value) -> str:
    """``model.config.rope_theta = 500000.0``: the path and the JSON value, as the spec shows it."""
    return f"{path} = {json.dumps(value, ensure_ascii=False)}"


def initial_from(proposal: Proposal) -> dict:
    """Form values that reproduce a stored proposal, for editing a draft."""
    initial = {"title": proposal.title, "body": proposal.body, "open_now": False}
    if proposal.voting_period:
        initial["voting_hours"] = proposal.voting_period.total_seconds() / 3600
    spec = proposal.spec
    if proposal.kind == Proposal.Kind.TRAINING:
        for name, (path, _) in TRAINING_FIELDS.items():
            value = _get_path(spec, path)
            if value is not None:
                initial[name] = value
    else:
        initial.update(action=spec.get("action"), description=spec.get("description", ""))
        if spec.get("action") == "retire":
            initial["guardrail_id"] = spec.get("guardrail_id")
        else:
            initial.update(guardrail_kind=spec.get("kind"), patterns="\n".join(spec.get("patterns") or []))
    return initial


def _flatten(detail, prefix: str = "") -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = prefix if key == "non_field_errors" else (f"{prefix}.{key}" if prefix else str(key))
            out.update(_flatten(value, name))
    elif isinstance(detail, list):
        out.setdefault(prefix, []).extend(str(item) for item in detail)
    else:
        out.setdefault(prefix, []).append(str(detail))
    return out


class TrainingProposalForm(ProposalBaseForm):
    """``draft_spec``: the stored spec of the draft being edited. The settings it holds that the form has no
    input for are kept (``kept``) under the form's values, unless the member ticks them off or they belong to
    the architecture the form switched away from (``dropped`` after ``spec()``, for the member to be told)."""

    kind = Proposal.Kind.TRAINING

    def __init__(self, *args, draft_spec: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept = draft_extras(draft_spec) if draft_spec else {}
        self.draft_arch = _get_path(draft_spec or {}, "model.arch")
        self.dropped: dict = {}
        if self.kept:
            self.fields["drop_kept"] = forms.MultipleChoiceField(
                choices=[(path, setting_text(path, value)) for path, value in self.kept.items()],
                required=False, widget=forms.CheckboxSelectMultiple, label="Also kept from the draft",
                help_text="Settings this form has no input for, kept as the draft has them. Tick one to drop it "
                          "(it goes back to its default). Switching the architecture drops the model settings "
                          "the new one does not read.",
            )
        defaults = {}
        default_spec = spec_normalise(kind="training", spec={})
        for name, (path, serializer_class) in TRAINING_FIELDS.items():
            if serializer_class is None:  # a Hugging Face config key: empty means the architecture's default
                spec_field, value = None, None
                help_text = HF_CONFIG_HELP[name]
            else:
                spec_field = _spec_field(path, serializer_class)
                value = _get_path(default_spec, path)  # None under model.lora: no LoRA by default
                help_text = spec_field.help_text
            if name == "lora_rank":
                help_text = ("Empty: train every weight. A rank (1–256) trains low-rank adapters over the frozen "
                             "weights of an existing version instead (not with Start from: scratch).")
            defaults[name] = value
            common = {"label": _label(name), "help_text": help_text, "required": False, "initial": value}
            if name == "allow_cpu":
                self.fields[name] = forms.BooleanField(**common)
            elif name in CHOICE_FIELDS:
                self.fields[name] = forms.ChoiceField(choices=list(spec_field.choices.items()), **common)
            else:
                # Plain text inputs: type and range checks are the serializer's, so messages match the API.
                attrs = {"inputmode": "decimal"} if name in FLOAT_FIELDS else {}
                self.fields[name] = forms.CharField(widget=forms.TextInput(attrs=attrs), **common)
        self.defaults = defaults

    def groups(self):
        return [(title, text, [self[name] for name in names]) for title, text, names in TRAINING_GROUPS]

    def clean(self):
        data = super().clean()
        if data.get("lora_alpha") not in (None, "") and data.get("lora_rank") in (None, ""):
            self.add_error("lora_alpha", "Only used with a LoRA rank; set the rank too, or leave this empty.")
        return data

    def spec(self) -> dict:
        spec: dict = {}
        arch = self.cleaned_data.get("arch") or "byte-gpt"
        for name, (path, _) in TRAINING_FIELDS.items():
            value = self.cleaned_data.get(name)
            if name in CONFIG_ARCHES and arch not in CONFIG_ARCHES[name]:
                continue  # another architecture's key: the model zoo would refuse it as unknown
            if name == "lora_alpha" and self.cleaned_data.get("lora_rank") in (None, ""):
                continue
            if name in CONFIG_ARCHES and arch != "byte-gpt" and isinstance(value, str):
                # The model zoo reads JSON numbers, as the API sends them; anything else reaches it as written
                # so its error names the key.
                value = int(value) if INTEGER_RE.fullmatch(value.strip()) else value
            if name == "allow_cpu":
                _set_path(spec, path, bool(value))
            elif name == "dataset_sha256":
                _set_path(spec, path, value or None)
            elif value not in (None, "") and not self._sparse_default_applies(name, value):
                _set_path(spec, path, value)
        self._merge_kept(spec, arch)
        return spec

    def _sparse_default_applies(self, name: str, value) -> bool:
        """True for a setting left at its dense default in a proposal that turns a sparse compression on: the
        spec then gets the sparse default (``governance.specs.sparse_defaults``), as the API does when the key
        is left out. A draft that was already sparse keeps what its form shows."""
        if name not in SPARSE_DEFAULT_FIELDS or self.cleaned_data.get("compression") not in SPARSE_COMPRESSIONS:
            return False
        if self.initial.get("compression") in SPARSE_COMPRESSIONS:
            return False
        default = self.defaults.get(name)
        try:
            return value == default if isinstance(default, str) else float(value) == float(default)
        except (TypeError, ValueError):
            return False  # not a number: the serializer's error names the field

    def _merge_kept(self, spec: dict, arch: str) -> None:
        self.dropped = {}
        ticked_off = set(self.cleaned_data.get("drop_kept") or ())
        accepted = None
        for path, value in self.kept.items():
            if path in ticked_off:
                continue
            if path.startswith("model.lora.") and _get_path(spec, "model.lora") is None:
                continue  # the rank was cleared: no LoRA, so none of its settings
            if arch != self.draft_arch and path.startswith("model.config."):
                accepted = _config_keys(arch) if accepted is None else accepted
                if path.split(".")[2] not in accepted:  # the model zoo would refuse it as unknown
                    self.dropped[path] = value
                    continue
            if arch != self.draft_arch and path == "model.lora.target_modules":
                self.dropped[path] = value  # module names of the previous architecture's layers
                continue
            _set_path(spec, path, value)

    def field_for_error(self, name: str) -> str | None:
        for field, (path, _) in TRAINING_FIELDS.items():
            if name == f"spec.{path}":
                return field
        if name.removeprefix("spec.") in self.kept:
            return "drop_kept"
        if name.startswith("spec.model.lora"):  # LoRA as a whole (from scratch, no target modules)
            return "lora_rank"
        return super().field_for_error(name)


class GuardrailProposalForm(ProposalBaseForm):
    kind = Proposal.Kind.GUARDRAIL
    action = forms.ChoiceField(
        choices=[("adopt", "Adopt a new guardrail"), ("retire", "Retire a guardrail in force")],
        initial="adopt",
        help_text=GuardrailSpec().fields["action"].help_text,
    )
    guardrail_kind = forms.ChoiceField(
        choices=Guardrail.Kind.choices,
        required=False,
        label="Kind",
        help_text="Data filters drop matching documents before workers train on them; output filters stop the "
        "playground from showing matching text.",
    )
    patterns = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 5, "spellcheck": "false", "class": "mono"}),
        help_text="One RE2 regular expression per line, matched case-insensitively in linear time, so no "
        "backreferences or lookaround (for example <code>\\bpassword\\s*=</code>). 1–50 lines, each at most "
        "200 characters.",
    )
    guardrail_id = forms.TypedChoiceField(
        coerce=int, required=False, empty_value=None, label="Guardrail to retire",
        help_text="Only for retiring: which guardrail in force should go.",
    )
    description = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text=GuardrailSpec().fields["description"].help_text,
    )

    def __init__(self, *args, guardrails=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["guardrail_id"].choices = [("", "—")] + [
            (g.pk, f"#{g.pk} {g.title} ({g.get_kind_display().lower()})") for g in guardrails
        ]

    def spec(self) -> dict:
        data = self.cleaned_data
        if data.get("action") == "retire":
            return {"action": "retire", "guardrail_id": data.get("guardrail_id"),
                    "description": data.get("description", "")}
        lines = [line.strip() for line in (data.get("patterns") or "").splitlines()]
        return {
            "action": "adopt",
            "kind": data.get("guardrail_kind"),
            "patterns": [line for line in lines if line],
            "description": data.get("description", ""),
        }

    def field_for_error(self, name: str) -> str | None:
        if name.startswith("spec.patterns"):
            return "patterns"
        mapping = {"spec.kind": "guardrail_kind", "spec.guardrail_id": "guardrail_id",
                   "spec.description": "description", "spec.action": "action"}
        return mapping.get(name) or super().field_for_error(name)

    def add_spec_errors(self, errors: dict) -> None:
        # Pattern errors are keyed by index; say which pattern.
        patterns = (errors.get("spec") or {}).get("patterns") if isinstance(errors.get("spec"), dict) else None
        if isinstance(patterns, dict):
            errors = {**errors, "spec": {**errors["spec"]}}
            errors["spec"]["patterns"] = [
                f"Pattern {int(index) + 1}: {msg}" for index, msgs in patterns.items() for msg in msgs
            ]
        super().add_spec_errors(errors)


class VetoForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}), max_length=2000,
        help_text="Required. Published in the ledger with the veto.",
    )


class CommentForm(forms.Form):
    body = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}), max_length=5000, label="Add a comment",
        help_text="Markdown. Mention a member with @username to notify them. Be kind; comments are public.",
    )


class CloseEarlyForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 2}), max_length=500, label="Reason for closing early",
        help_text="Required. Published in the ledger; the tally as it stands decides.",
    )


class DelegationForm(forms.Form):
    delegate = forms.CharField(max_length=150, label="Member", help_text="The username of the member who votes for you.")
    kind = forms.ChoiceField(
        choices=[("", "All proposals"), *Proposal.Kind.choices], required=False, label="On",
        help_text="A delegation for one kind of proposal wins over the one for all proposals.",
    )
