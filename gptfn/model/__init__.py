"""The model: pure functions of a parameter tree that carries its own architecture.

- ``config.py``: ``GPTConfig``, the one declaration of every architecture option (help line,
  allowed values); stored in the tree as ``params["config"]`` (static data, not a leaf).
- ``context.py``: ``Context``, what the layers of one pass share (rotary tables, mask, cache,
  attention kernel, dropout, hook and the activation-name prefix), built once per call.
- ``layers.py``: linear maps, embeddings, norms, rotary positions, MLP variants.
- ``attention.py``: the attention step (projections, QK-norm, rotary, the key/value cache
  update, fast or reference softmax attention).
- ``core.py``: ``init`` (the tree layout of every option), the one ``block`` that ``forward``,
  generation, capture/patching and remat all run, ``forward``, ``loss``.
- ``remat.py``: activation checkpointing that works under ``torch.func``.

Tree layout (d = n_embd, h = n_head, g = n_kv_head, k = d_head, f = d_mlp, V = vocab,
T = block_size); optional leaves appear only when the config asks for them::

    config (GPTConfig)   wte [V, d]   wpe [T, d] (learned positions)   unembed [V, d] (untied)
    ln_f.{scale, bias} [d]
    blocks.{i}.ln_1 / ln_2.{scale, bias} [d]                    (bias: norm_bias; not post)
    blocks.{i}.ln_attn_out / ln_mlp_out.{scale, bias} [d]       (norm_position post, sandwich)
    blocks.{i}.attn.w_q [d, h, k]   w_k, w_v [d, g, k]   w_o [h, k, d]
    blocks.{i}.attn.b_q [h, k]   b_k, b_v [g, k] (qkv_bias)   b_o [d] (bias)
    blocks.{i}.attn.q_norm / k_norm.{scale, bias} [k]           (qk_norm; [hk], [gk] projection)
    blocks.{i}.mlp.w_in [d, f]   w_gate [d, f] (swiglu, geglu)   w_out [f, d]
    blocks.{i}.mlp.b_in, b_gate [f]   b_out [d]                 (mlp_bias)

Adding a variant that changes the math: a field (help, allowed values, cross-field checks) in
``config.py``, which also gives it a ``gptfn train`` flag and TOML key; its leaves, if any, in
``core._spec`` (which ``init`` and ``check_params`` both read); one branch in the layer it
changes (``layers.py``, ``attention.py``, or ``core.block`` for how branches combine); a row in
docs/models.md; and a mapping in each family that has it (the others refuse it by name, with no
edit). Generation, capture/patching, remat and the activation-name list follow, because they all
run ``core.block``.
"""

from gptfn.model.attention import attend, attention_out, attention_qkv, update_cache
from gptfn.model.config import GPTConfig
from gptfn.model.context import AttentionImpl, Context, Hook
from gptfn.model.core import (
    block,
    check_params,
    check_tokens,
    context,
    forward,
    init,
    loss,
    run_blocks,
    unembed,
)
from gptfn.model.layers import apply_rotary, embed, layer_norm, mlp, norm, rotary_tables
from gptfn.model.remat import remat

__all__ = [
    "AttentionImpl",
    "Context",
    "GPTConfig",
    "Hook",
    "apply_rotary",
    "attend",
    "attention_out",
    "attention_qkv",
    "block",
    "check_params",
    "check_tokens",
    "context",
    "embed",
    "forward",
    "init",
    "layer_norm",
    "loss",
    "mlp",
    "norm",
    "remat",
    "rotary_tables",
    "run_blocks",
    "unembed",
    "update_cache",
]
