"""HF transformers' own model holding the very tensors a ferrolm model runs: the bench's
HF baseline (same weights, same dtype, same prompts). Built for the families whose row
in models/families.py names an `hf_twin` class with the Llama layout (Llama, SmolLM);
others are refused with the list.
"""

from __future__ import annotations

import torch

from ferrolm.models.families import FAMILIES, family_by_name


def hf_twin(model, dtype: torch.dtype):
    """An HF causal LM with `model`'s weights in `dtype` (HF runs every tensor in the
    compute dtype; ferrolm keeps norms and head in fp32)."""
    import transformers

    c = model.config
    name = family_by_name(c.family).hf_twin
    if name is None:
        have = ", ".join(f.name for f in FAMILIES if f.hf_twin)
        raise ValueError(f"the HF baseline is built for {have}; this model is {c.family}")
    hf_cfg = getattr(transformers, name.replace("ForCausalLM", "Config"))(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        rope_scaling=c.rope_scaling,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings,
        attention_bias=c.attention_bias,
    )
    with torch.device("meta"):
        hf = getattr(transformers, name)(hf_cfg)
    state = {
        ("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v.to(dtype)
        for k, v in model.dense_state_dict().items()
    }
    hf.load_state_dict(state, strict=False, assign=True)
    if c.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_cfg)  # buffers were on meta
    return hf.eval()
