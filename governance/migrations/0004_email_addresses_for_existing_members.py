"""Members who signed up before e-mail verification existed get their address on record, unverified, so
they can ask for a verification mail from their profile (voting now needs a verified address)."""

from django.conf import settings
from django.db import migrations


def record_addresses(apps, schema_editor):
    User = apps.get_model(*settings.AUTH_USER_MODEL.split("."))
    EmailAddress = apps.get_model("account", "EmailAddress")
    have = set(EmailAddress.objects.values_list("user_id", flat=True))
    EmailAddress.objects.bulk_create(
        [
            EmailAddress(user_id=user_id, email=email.lower(), primary=True, verified=False)
            for user_id, email in User.objects.exclude(email="").values_list("id", "email")
            if user_id not in have
        ],
        batch_size=1000,
    )


class Migration(migrations.Migration):
    dependencies = [
        ("governance", "0003_voter_eligibility"),
        ("account", "0009_emailaddress_unique_primary_email"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [migrations.RunPython(record_addresses, migrations.RunPython.noop)]
