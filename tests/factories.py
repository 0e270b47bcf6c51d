from datetime import UTC, datetime

import factory
from allauth.account.models import EmailAddress
from django.contrib.auth import get_user_model


class UserFactory(factory.django.DjangoModelFactory):
    """A member who may vote under the default eligibility rule: a verified e-mail address and an account
    made long ago (so it is old enough at any moment a test travels to). ``UserFactory(verified=False)``,
    ``email=""`` or a recent ``date_joined`` for the others."""

    class Meta:
        model = get_user_model()
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"member{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.org")
    password = factory.PostGenerationMethodCall("set_password", "correct horse battery")
    date_joined = datetime(2001, 1, 1, tzinfo=UTC)

    @factory.post_generation
    def _save(obj, create, extracted, **kwargs):
        if create:
            obj.save()

    @factory.post_generation
    def verified(obj, create, extracted, **kwargs):
        """allauth's record of the address: verified unless ``verified=False``."""
        if create and obj.email:
            EmailAddress.objects.create(user=obj, email=obj.email, primary=True, verified=extracted is not False)
