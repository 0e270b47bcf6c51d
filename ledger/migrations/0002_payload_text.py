"""Store each payload as the canonical JSON text that was hashed, instead of ``jsonb``.

``jsonb`` rewrote numbers (``1e16`` → ``10000000000000000``, ``-0.0`` → ``0.0``), so untampered entries
stopped verifying. Existing payloads are carried over as canonical text; where jsonb had rewritten a
number, ``ledger.repair.restore_payload`` recovers the original reading from the recorded hash.
"""

import json

from django.db import migrations, models

from ledger.chain import stored_json
from ledger.repair import restore_payload

BATCH = 1000


def payload_to_text(apps, schema_editor):
    Entry = apps.get_model("ledger", "Entry")
    batch = []
    for row in Entry.objects.order_by("seq").iterator(chunk_size=BATCH):
        entry = {
            "seq": row.seq,
            "created_at": row.created_at.isoformat().replace("+00:00", "Z"),
            "actor": row.actor,
            "action": row.action,
            "subject": row.subject,
            "payload": row.payload,
            "prev_hash": row.prev_hash,
            "hash": row.hash,
        }
        row.payload_json = stored_json(restore_payload(entry))
        batch.append(row)
        if len(batch) >= BATCH:
            Entry.objects.bulk_update(batch, ["payload_json"])
            batch.clear()
    if batch:
        Entry.objects.bulk_update(batch, ["payload_json"])


def text_to_payload(apps, schema_editor):
    Entry = apps.get_model("ledger", "Entry")
    batch = []
    for row in Entry.objects.order_by("seq").iterator(chunk_size=BATCH):
        row.payload = json.loads(row.payload_json)
        batch.append(row)
        if len(batch) >= BATCH:
            Entry.objects.bulk_update(batch, ["payload"])
            batch.clear()
    if batch:
        Entry.objects.bulk_update(batch, ["payload"])


class Migration(migrations.Migration):

    dependencies = [
        ("ledger", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="entry",
            name="payload_json",
            field=models.TextField(default="{}"),
        ),
        migrations.RunPython(payload_to_text, text_to_payload),
        migrations.RemoveField(
            model_name="entry",
            name="payload",
        ),
    ]
