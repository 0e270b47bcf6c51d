"""DiLoCo library for Agora: pure PyTorch, no Django.

Submodules (import what you need; this package imports nothing heavy on its own):

- ``diloco.models``: the model zoo (byte-gpt, Hugging Face llama and gpt2): ``build_model``,
  ``validate_model_config``, ``param_count``, ``init_state``, ``load_hf_directory``, ``generate_tokens``.
- ``diloco.lora``: LoRA adapters through peft: ``apply_lora``, ``trainable_state``, ``merge_lora``.
- ``diloco.hf_export``: a model version as a Hugging Face directory (``export_hf_directory``).
- ``diloco.data``: datasets (built-in, local file, sha256-pinned https), split, shards, batches.
- ``diloco.guardrails``: data and output filters from governance guardrail dicts.
- ``diloco.inner``: the inner AdamW loop returning the pseudo-gradient (bf16 autocast, fused AdamW on CUDA).
- ``diloco.outer``: the outer Nesterov SGD optimizer with exportable state.
- ``diloco.codecs``: fp32 / fp16 / int8 pseudo-gradient codecs as safetensors bytes.
- ``diloco.aggregate``: mean, trimmed mean, median, norm-clipped mean and update screening.
- ``diloco.round``: one outer round (screen, aggregate, outer step, evaluation gate) as plain functions.
- ``diloco.replica``: spot re-computation: does a task's replica agree with it (``compare``), which shards
  to check (``sample_shards``), which of a disagreeing pair to keep (``favoured``).
- ``diloco.evaluate``: deterministic held-out loss.
- ``diloco.checkpoint``: weights as safetensors bytes with JSON metadata.
"""

__all__: list[str] = []
