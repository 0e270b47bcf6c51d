import factory

from marketplace.models import Worker
from marketplace.presence import token_hash
from tests.factories import UserFactory


class WorkerFactory(factory.django.DjangoModelFactory):
    """A worker whose plain token is ``worker-token-<n>`` (kept on the instance as ``plain_token``)."""

    class Meta:
        model = Worker
        skip_postgeneration_save = True

    owner = factory.SubFactory(UserFactory)
    name = factory.Sequence(lambda n: f"rig-{n}")
    gpus = factory.LazyFunction(lambda: [{"name": "NVIDIA GeForce RTX 3090", "memory_mb": 24576}])
    cpu_count = 16
    memory_mb = 65536
    torch_version = "2.13.0"
    cuda_version = "12.4"
    benchmark_tflops = 35.5
    benchmark_mem_gbps = 900.0
    agent_version = "0.1.0"
    plain_token = factory.Sequence(lambda n: f"worker-token-{n}")
    token_hash = factory.LazyAttribute(lambda o: token_hash(o.plain_token))

    @classmethod
    def _create(cls, model_class, *args, **kwargs):
        plain = kwargs.pop("plain_token")
        obj = super()._create(model_class, *args, **kwargs)
        obj.plain_token = plain
        return obj


def bearer(worker) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {worker.plain_token}"}


def enroll_body(token: str, **overrides) -> dict:
    body = {
        "enrollment_token": token,
        "name": "basement-3090",
        "hardware": {
            "gpus": [{"name": "NVIDIA GeForce RTX 3090", "memory_mb": 24576}],
            "cpu_count": 16,
            "memory_mb": 65536,
            "torch": "2.13.0",
            "cuda": "12.4",
        },
        "benchmark": {"tflops": 35.5, "mem_gbps": 900.0},
        "agent_version": "0.1.0",
    }
    body.update(overrides)
    return body
