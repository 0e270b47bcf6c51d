"""A read-only admin base: records the services write (and the ledger records) are never made by hand.

Staff see everything; changes go through the pages and admin actions, which call the services. Nothing is
added, edited or deleted through admin forms.
"""

from __future__ import annotations

from django.contrib import admin


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


def brand(site: admin.AdminSite) -> None:
    site.site_header = "Agora administration"
    site.site_title = "Agora admin"
    site.index_title = "Records (read-only: changes go through the site's pages and actions)"
