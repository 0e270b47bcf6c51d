from django.contrib import admin

from core.admin import ReadOnlyAdmin
from ledger.models import Entry


@admin.register(Entry)
class EntryAdmin(ReadOnlyAdmin):
    """Read-only: the chain is written by services, never by hand."""

    list_display = ("seq", "created_at", "actor", "action", "subject", "short_hash")
    list_filter = ("action",)
    search_fields = ("actor", "subject", "hash")

    @admin.display(description="hash")
    def short_hash(self, obj):
        return obj.hash[:12]
