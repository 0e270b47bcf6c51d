"""A model version as a Hugging Face directory: ``AutoModelForCausalLM.from_pretrained(dir)`` and
``AutoTokenizer.from_pretrained(dir)`` load it, and ``generate()`` runs on it.

The directory holds ``config.json``, ``model.safetensors`` (fp32, untied), ``generation_config.json``,
``tokenizer.json`` with ``tokenizer_config.json`` and ``special_tokens_map.json``, and the model card as
``README.md``. ``llama`` and ``gpt2`` states already carry Hugging Face's names and are written as they are.
``byte-gpt`` is GPT-2-shaped, so it is exported as the equivalent GPT-2 (:func:`byte_gpt_to_gpt2`: the same
pre-LayerNorm blocks, exact GELU, Conv1D weights transposed) with a byte-level ``tokenizer.json`` whose
256 tokens are the 256 bytes (:func:`byte_tokenizer_json`). A LoRA version is merged first
(``diloco.lora.merge_lora``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from diloco.models import GPTConfig, build_model, hf_config, validate_model_config

EXPORT_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "README.md")

# byte-gpt module names -> GPT-2's, and whether the weight is a Linear that GPT-2 keeps as a Conv1D
# (stored transposed: [in, out]).
_BLOCK_MAP = {
    "ln_1.weight": ("ln_1.weight", False), "ln_1.bias": ("ln_1.bias", False),
    "attn.c_attn.weight": ("attn.c_attn.weight", True), "attn.c_attn.bias": ("attn.c_attn.bias", False),
    "attn.c_proj.weight": ("attn.c_proj.weight", True), "attn.c_proj.bias": ("attn.c_proj.bias", False),
    "ln_2.weight": ("ln_2.weight", False), "ln_2.bias": ("ln_2.bias", False),
    "mlp.0.weight": ("mlp.c_fc.weight", True), "mlp.0.bias": ("mlp.c_fc.bias", False),
    "mlp.2.weight": ("mlp.c_proj.weight", True), "mlp.2.bias": ("mlp.c_proj.bias", False),
}
_TOP_MAP = {"wte.weight": "transformer.wte.weight", "wpe.weight": "transformer.wpe.weight",
            "ln_f.weight": "transformer.ln_f.weight", "ln_f.bias": "transformer.ln_f.bias",
            "lm_head.weight": "lm_head.weight"}


def byte_gpt_to_gpt2(config: dict, state: dict[str, Tensor], *,
                     vocab_size: int | None = None) -> tuple[dict, dict[str, Tensor]]:
    """The GPT-2 ``(config, state)`` computing exactly what byte-gpt ``config``/``state`` computes.

    byte-gpt's blocks are GPT-2's (pre-LayerNorm, eps 1e-5, fused qkv split q|k|v, 4x MLP) with
    ``nn.GELU()`` (exact erf GELU, GPT-2's ``activation_function="gelu"``) and ``nn.Linear`` where GPT-2
    has ``Conv1D``, so the matrices are transposed. Dropout is not exported (0 for inference).
    """
    cfg = GPTConfig.from_dict({**config, **({"vocab_size": vocab_size} if vocab_size is not None else {})})
    gpt2 = {"vocab_size": cfg.vocab_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_positions": cfg.block_size, "n_inner": None, "activation_function": "gelu",
            "layer_norm_epsilon": 1e-5}
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name in _TOP_MAP:
            out[_TOP_MAP[name]] = tensor
            continue
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in _BLOCK_MAP:
            raise ValueError(f"byte-gpt state has an unexpected tensor {name}")
        target, transpose = _BLOCK_MAP[parts[2]]
        out[f"transformer.h.{parts[1]}.{target}"] = tensor.t() if transpose else tensor
    return validate_model_config("gpt2", gpt2), out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (the byte-level alphabet of ``tokenizers``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer_json() -> bytes:
    """A ``tokenizer.json`` whose token id *i* is byte *i* (256 tokens, no merges, no special tokens): what
    byte-gpt reads, in the format every Hugging Face tokenizer loader understands. Deterministic bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return json.dumps(json.loads(tok.to_str()), sort_keys=True, ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")


def _special_tokens(tokenizer_json: bytes) -> tuple[str | None, int | None]:
    """The end-of-text token (name, id) of a ``tokenizer.json``, if it has one."""
    from diloco.tokenization import EOS_NAMES

    parsed = json.loads(tokenizer_json)
    added = {t.get("content"): t.get("id") for t in parsed.get("added_tokens") or [] if isinstance(t, dict)}
    vocab = (parsed.get("model") or {}).get("vocab")
    vocab = vocab if isinstance(vocab, dict) else {}
    for name in EOS_NAMES:
        for table in (added, vocab):
            if isinstance(table.get(name), int):
                return name, table[name]
    return None, None


def export_hf_directory(out_dir, *, arch: str, config: dict, state: dict[str, Tensor],
                        tokenizer_json: bytes | None, model_card: str, vocab_size: int | None = None) -> Path:
    """Write the Hugging Face directory of ``arch``/``config``/``state`` into ``out_dir`` (created; files of
    the same names are replaced) and return its path.

    ``tokenizer_json`` is the run's tokenizer (None: the byte tokenizer, for byte-level models);
    ``model_card`` becomes ``README.md``. Raises ValueError when ``state`` does not fit the config or the
    tokenizer has more ids than the model's vocabulary.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if arch == "byte-gpt":
        config, state = byte_gpt_to_gpt2(config, state, vocab_size=vocab_size)
        arch, vocab_size = "gpt2", None
    if tokenizer_json is None:
        tokenizer_json = byte_tokenizer_json()
    cfg = hf_config(arch, config, vocab_size=vocab_size)
    eos_name, eos_id = _special_tokens(tokenizer_json)
    tokenizer_ids = max(tokenizer_ids_of(tokenizer_json), default=-1) + 1
    if tokenizer_ids > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer_ids} ids, more than the model's vocabulary of {cfg.vocab_size}")
    cfg.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[arch]]
    cfg.eos_token_id = cfg.pad_token_id = eos_id
    cfg.dtype = "float32"

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(arch, config, seed=None,
                                                                vocab_size=vocab_size).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the weights do not fit the {arch} config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"tensor {name} has shape {tuple(state[name].shape)}, the config needs {shape}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    tensors = {k: state[k].detach().to("cpu", torch.float32).contiguous() for k in sorted(expected)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    GenerationConfig(eos_token_id=eos_id, pad_token_id=eos_id, do_sample=True, temperature=0.8, top_k=40,
                     max_new_tokens=min(256, _context_length(arch, cfg))).save_pretrained(out)
    (out / "tokenizer.json").write_bytes(tokenizer_json)
    specials = {"eos_token": eos_name, "pad_token": eos_name} if eos_name else {}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": _context_length(arch, cfg),
        "clean_up_tokenization_spaces": False, "add_prefix_space": False, **specials}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    (out / "README.md").write_text(model_card if model_card.endswith("\n") else model_card + "\n")
    return out


def _context_length(arch: str, cfg) -> int:
    return int(cfg.max_position_embeddings if arch == "llama" else cfg.n_positions)


def tokenizer_ids_of(tokenizer_json: bytes) -> list[int]:
    """Every id a ``tokenizer.json`` can produce (its vocabulary and added tokens)."""
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    except Exception as exc:  # the library raises plain Exception subclasses for every parse problem
        raise ValueError(f"tokenizer.json cannot be loaded: {exc}") from None
    return list(backend.get_vocab(with_added_tokens=True).values())
