"""The Llama peer of the GPU benchmarks: transformers' LlamaForCausalLM at the anchors' 130M shape, SDPA."""

from __future__ import annotations

import transformers


def llama_130m_config(max_position_embeddings: int = 131072) -> transformers.LlamaConfig:
    """12 layers of width 768, 12 heads (no GQA), MLP 3072, the GPT-NeoX vocabulary (50,280), SDPA attention."""
    return transformers.LlamaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                    num_key_value_heads=12, intermediate_size=3072,
                                    max_position_embeddings=max_position_embeddings, attn_implementation="sdpa")
