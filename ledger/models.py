import json

from django.db import models


class Entry(models.Model):
    """One link of the public hash chain. Rows are only ever appended by ``ledger.services.entry_append``."""

    seq = models.PositiveBigIntegerField(unique=True)
    created_at = models.DateTimeField()
    actor = models.CharField(max_length=150)
    action = models.CharField(max_length=64, db_index=True)
    subject = models.CharField(max_length=64, blank=True, db_index=True)
    # The payload exactly as it was hashed, as ASCII canonical JSON text (``ledger.chain.stored_json``).
    # Not ``jsonb``: PostgreSQL rewrites numbers there (1e16, -0.0), and the entry would stop verifying.
    payload_json = models.TextField(default="{}")
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    class Meta:
        ordering = ["seq"]
        verbose_name_plural = "entries"

    def __str__(self) -> str:
        return f"#{self.seq} {self.action} by {self.actor}"

    @property
    def payload(self):
        """The payload as a JSON value (the parsed ``payload_json``); the raw text if a hand edit left it
        unparseable, so pages still render and the verifier names this entry (its hash cannot match)."""
        try:
            return json.loads(self.payload_json)
        except (ValueError, RecursionError):
            return self.payload_json

    def as_chain_dict(self) -> dict:
        return {
            "seq": self.seq,
            "created_at": self.created_at.isoformat().replace("+00:00", "Z"),
            "actor": self.actor,
            "action": self.action,
            "subject": self.subject,
            "payload": self.payload,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


class Head(models.Model):
    """The single row every append locks, so the chain stays linear under concurrent writers."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    seq = models.PositiveBigIntegerField(default=0)
    hash = models.CharField(max_length=64)

    class Meta:
        constraints = [models.CheckConstraint(condition=models.Q(id=1), name="ledger_head_singleton")]

    def __str__(self) -> str:
        return f"head at seq {self.seq}"
