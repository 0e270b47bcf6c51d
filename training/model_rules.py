"""The model zoo's rules as governance's spec validation sees them (registered in ``TrainingConfig.ready``).

Governance may not import ``diloco``; training may, so it hands governance these two functions.
"""

from __future__ import annotations

from diloco import models as zoo


def validate_config(arch: str, config: dict) -> dict:
    """The normalised config of ``arch`` (ValueError naming the key when it is not acceptable, LookupError
    for an architecture this server cannot build)."""
    validate = getattr(zoo, "validate_model_config", None)
    if validate is None or arch not in getattr(zoo, "ARCHES", ()):
        raise LookupError(f"This server cannot build {arch} models yet.")
    return validate(arch, dict(config))


def count_params(arch: str, config: dict) -> int:
    counter = getattr(zoo, "param_count", None)
    if counter is not None:
        return int(counter(arch, config))
    if arch == "byte-gpt":  # embeddings + blocks (qkv, proj, 4x MLP, two norms) + final norm + head
        d, n, t = config["n_embd"], config["n_layer"], config["block_size"]
        return 256 * d + t * d + n * (12 * d * d + 13 * d) + 2 * d + d * 256
    raise ValueError(f"cannot count the parameters of {arch} models")
