"""A model version as a Hugging Face directory, streamed as a .tar.gz (``AutoModelForCausalLM.from_pretrained``).

The directory is written once per version into the var folder's export cache (a version never changes, so
neither does its export) and streamed from there in 1 MiB pieces: memory stays flat for large models. The
cache is bounded (``export_sweep``, run by the beat's ``training.sweep_blobs``): it keeps the most recently
downloaded ``AGORA_EXPORT_CACHE_KEEP`` versions and drops any unused for ``AGORA_EXPORT_CACHE_MAX_AGE_H``. The
model card ties the weights to the public record: the proposal and its content hash, the data, the
guardrails, the contributors and the ledger entries the version came from.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings
from django.db.models import Max, Min

from ledger.models import Entry
from training.models import ModelVersion, Task
from training.services.versions import version_state, version_tokenizer_json

CHUNK = 1 << 20
EXPORT_MTIME = 1_700_000_000  # fixed, so the same version always streams the same bytes
# A cached directory used this recently is never swept: a download in flight touches its directory as it opens
# each file, and a half-written export is younger than this.
EXPORT_GRACE_S = 3600


def export_root() -> Path:
    return Path(settings.VAR_DIR) / "exports"


def export_name(version: ModelVersion) -> str:
    return f"{version.model.slug}-v{version.number}"


def _ledger_range(version: ModelVersion) -> tuple[int | None, int | None]:
    """The first and last ledger entries behind the version: its run's entries up to its publication (or its
    import's entry)."""
    subjects = [f"model:{version.model.slug}"]
    if version.run_id:
        subjects.append(f"run:{version.run_id}")
    entries = Entry.objects.filter(subject=f"model:{version.model.slug}",
                                   action__in=["model.version_published", "model.imported", "model.created"])
    last = max((e.seq for e in entries if isinstance(e.payload, dict) and e.payload.get("version") == version.number),
               default=None)
    qs = Entry.objects.filter(subject__in=subjects)
    if last is not None:
        qs = qs.filter(seq__lte=last)
    span = qs.aggregate(first=Min("seq"), last=Max("seq"))
    return span["first"], last if last is not None else span["last"]


def _contributors(version: ModelVersion) -> list[tuple[str, str, int]]:
    """(worker, owner, accepted updates) for every worker whose update went into the version's run up to it."""
    if not version.run_id:
        return []
    tasks = Task.objects.filter(round__run_id=version.run_id, status=Task.Status.ACCEPTED,
                                round__index__lte=version.round.index if version.round_id else 10**9)
    counts: dict[tuple[str, str], int] = {}
    for name, owner in tasks.values_list("worker__name", "worker__owner__username"):
        counts[(name, owner)] = counts.get((name, owner), 0) + 1
    return sorted(((n, o, c) for (n, o), c in counts.items()), key=lambda x: (-x[2], x[0]))


def model_card(version: ModelVersion, *, content_sha256: str) -> str:
    """The README.md of an export (a Hugging Face model card with YAML front matter)."""
    model = version.model
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- agora", "- diloco",
             "---", "", f"# {model.name} v{version.number}", ""]
    if model.description:
        lines += [model.description, ""]
    lines += [f"- Architecture: `{version.arch}`" + (" (exported as GPT-2)" if version.arch == "byte-gpt" else ""),
              f"- Weights sha256 (model.safetensors as trained, Agora checkpoint): `{version.checkpoint_id}`",
              f"- sha256 of this export's model.safetensors: `{content_sha256}`",
              "- Tokenizer: " + (f"BPE `{version.tokenizer_sha256}`" if version.tokenizer_sha256 else "bytes (256 ids)"),
              f"- Held-out loss: {version.eval_loss:.4f}" if version.eval_loss is not None else "- Held-out loss: —",
              f"- Parent version: v{version.parent.number}" if version.parent_id else "- Parent version: none",
              ""]
    if version.lora:
        lines += [f"LoRA adapters (rank {version.lora['rank']}, alpha {version.lora['alpha']}, "
                  f"modules {', '.join(version.lora['target_modules'])}) merged into v{version.lora_base.number}.", ""]
    run = version.run
    if run is not None:
        proposal = run.proposal
        dataset = run.spec.get("dataset", {})
        lines += ["## Proposal", "",
                  f"Trained by run {run.pk}, round {version.round.index if version.round_id else '—'}, from proposal "
                  f"#{proposal.pk} \"{proposal.title}\".", "",
                  f"- Proposal content hash (sha256 of the frozen spec): `{proposal.content_hash}`", "",
                  "## Data", "", f"- Source: `{dataset.get('source', '—')}`"]
        if dataset.get("sha256"):
            lines.append(f"- Pinned sha256: `{dataset['sha256']}`")
        for key in ("format", "field", "heldout_fraction"):
            if dataset.get(key) not in (None, ""):
                lines.append(f"- {key}: {dataset[key]}")
        lines += ["", "## Guardrails", ""]
        guardrails = _run_guardrails(run)
        lines += [f"- #{g['id']} {g.get('title', '')}: removed {g.get('removed_train', 0)} training and "
                  f"{g.get('removed_heldout', 0)} held-out documents" for g in guardrails] or [
            "- No data filter was in force."]
        lines += ["", "## Contributors", ""]
        lines += [f"- {name} (owner {owner}): {count} accepted update{'s' if count != 1 else ''}"
                  for name, owner, count in _contributors(version)] or ["- none recorded"]
    else:
        lines += ["## Origin", "", f"{version.source or 'Imported'}.", ""]
    first, last = _ledger_range(version)
    lines += ["", "## Ledger", "",
              f"Ledger entries {first}–{last} record how this version came to be; verify them with "
              "`python manage.py verify_ledger` or the standalone verifier over `/api/v1/ledger/`.", ""]
    return "\n".join(lines)


def _run_guardrails(run) -> list[dict]:
    try:
        prepared = run.prepared_dataset
    except Exception:  # no prepared dataset: a byte-level run on the v1 text path
        return []
    return list(getattr(prepared, "guardrails", []) or [])


def export_directory(version: ModelVersion) -> Path:
    """The version's Hugging Face directory in the export cache, written on first use."""
    from diloco.hf_export import export_hf_directory

    root = export_root()
    final = root / f"{export_name(version)}-{version.checkpoint_id[:16]}"
    if (final / "model.safetensors").exists():
        try:
            os.utime(final)  # the directory's mtime is its last use, which the sweep keeps by
            return final
        except FileNotFoundError:  # swept just now: write it again
            pass
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        export_hf_directory(work, arch=version.arch, config=version.config, state=dict(version_state(version)),
                            tokenizer_json=version_tokenizer_json(version), model_card="",
                            vocab_size=version.vocab_size)
        digest = hashlib.sha256()
        with (work / "model.safetensors").open("rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
        (work / "README.md").write_text(model_card(version, content_sha256=digest.hexdigest()), encoding="utf-8")
        try:
            os.replace(work, final)
        except OSError:  # another request finished the same export first
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final


def tar_gz_stream(directory: Path, prefix: str) -> Iterator[bytes]:
    """A gzip-compressed tar of ``directory``'s files under ``prefix/``, produced piece by piece."""
    z = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        os.utime(directory)  # still in use: a long download outlives the sweep's grace by touching it
        info = tarfile.TarInfo(f"{prefix}/{path.name}")
        info.size, info.mtime, info.mode = path.stat().st_size, EXPORT_MTIME, 0o644
        yield z.compress(info.tobuf(format=tarfile.PAX_FORMAT))
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                out = z.compress(chunk)
                if out:
                    yield out
        yield z.compress(b"\0" * ((-info.size) % tarfile.BLOCKSIZE))
    yield z.compress(b"\0" * (2 * tarfile.BLOCKSIZE))  # the end-of-archive marker
    yield z.flush()


def export_sweep(*, keep: int, max_age_s: float, grace_s: float = EXPORT_GRACE_S, now: float | None = None) -> int:
    """Bound the export cache: remove every cached directory unused for ``max_age_s`` seconds and, beyond the
    ``keep`` most recently used, every one unused for ``grace_s``; also half-written exports (``.tmp-*``) older
    than ``grace_s``, left by a killed request. A directory in use is touched (``export_directory``,
    ``tar_gz_stream``), so a download in flight keeps its files. A swept version is written again on its next
    download. Returns how many directories went."""
    root = export_root()
    if not root.is_dir():
        return 0
    now = time.time() if now is None else now
    done, temp = [], []
    for path in root.iterdir():
        try:
            if not path.is_dir():
                continue
            used = path.stat().st_mtime
        except FileNotFoundError:  # removed meanwhile
            continue
        (temp if path.name.startswith(".tmp-") else done).append((used, path))
    done.sort(key=lambda item: item[0], reverse=True)
    doomed = [path for rank, (used, path) in enumerate(done)
              if now - used > max_age_s or (rank >= keep and now - used > grace_s)]
    doomed += [path for used, path in temp if now - used > grace_s]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return len(doomed)
