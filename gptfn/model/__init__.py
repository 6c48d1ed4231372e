"""The model: pure functions of a parameter tree that carries its own architecture.

- ``config.py``: ``GPTConfig``, every architecture option, validated; stored in the tree as
  ``params["config"]`` (static data, not a leaf).
- ``layers.py``: linear maps, embeddings, norms, rotary positions, MLP variants, dropout.
- ``attention.py``: the attention step (projections, QK-norm, rotary, the key/value cache
  update, fast or reference softmax attention).
- ``core.py``: ``init`` (the tree layout of every option), the one ``block`` that ``forward``,
  generation, capture/patching and remat all run, ``forward``, ``loss``.

Tree layout (d = n_embd, h = n_head, g = n_kv_head, k = d_head, f = d_mlp, V = vocab,
T = block_size); optional leaves appear only when the config asks for them::

    config (GPTConfig)   wte [V, d]   wpe [T, d] (learned positions)   unembed [V, d] (untied)
    ln_f.{scale, bias} [d]
    blocks.{i}.ln_1 / ln_2.{scale, bias} [d]                    (bias: norm_bias)
    blocks.{i}.attn.w_q [d, h, k]   w_k, w_v [d, g, k]   w_o [h, k, d]
    blocks.{i}.attn.b_q [h, k]   b_k, b_v [g, k] (qkv_bias)   b_o [d] (bias)
    blocks.{i}.attn.q_norm / k_norm.{scale, bias} [k]           (qk_norm)
    blocks.{i}.mlp.w_in [d, f]   w_gate [d, f] (swiglu, geglu)   w_out [f, d]
    blocks.{i}.mlp.b_in, b_gate [f]   b_out [d]                 (mlp_bias)

Adding a variant touches one place per concern: a field (with its check) in ``config.py``;
its leaves in ``core._spec`` (which ``init`` and ``check_params`` both read); its computation
in the layer it changes (``layers.py`` for norms, positions, MLPs; ``attention.py`` for
attention; ``core.block`` for how the branches combine). Generation, capture/patching, remat
and the activation-name list follow, because they all run ``core.block``.
"""

from gptfn.model.attention import attend, attention_out, attention_qkv, update_cache
from gptfn.model.config import GPTConfig, config_of
from gptfn.model.core import (
    block,
    check_params,
    check_tokens,
    forward,
    init,
    loss,
    run_blocks,
    unembed,
)
from gptfn.model.layers import Hook, apply_rotary, embed, layer_norm, mlp, norm, rotary_tables

__all__ = [
    "GPTConfig",
    "Hook",
    "apply_rotary",
    "attend",
    "attention_out",
    "attention_qkv",
    "block",
    "check_params",
    "check_tokens",
    "config_of",
    "embed",
    "forward",
    "init",
    "layer_norm",
    "loss",
    "mlp",
    "norm",
    "rotary_tables",
    "run_blocks",
    "unembed",
    "update_cache",
]
