"""How many hypothesis examples each gptfn.testing check needs to catch a real bug.

Each bug is a plausible mistake in a model variant: a mask that lets position t see t+1, a
forward that mixes rows, a parameter scaled in place, a hand-written backward that drops a term,
a function that branches on ``.item()`` (vmap-unsafe). For each, over 20 seeds, hypothesis
generates examples (no shrinking, no example database) until the check first fails; the table
gives the median and worst count. tests/test_testing.py asserts each is caught within the default
budget of 100 examples, using the same buggy functions.

    python experiments/testing_budget.py [--seeds 20]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
import torch.nn.functional as F
from hypothesis import Phase, given, seed, settings
from hypothesis import strategies as st

import gptfn
from gptfn.model import (
    Context,
    GPTConfig,
    attend,
    attention_out,
    attention_qkv,
    embed,
    layer_norm,
    mlp,
    unembed,
)
from gptfn.testing import (
    assert_batch_independent,
    assert_causal,
    assert_grads_match,
    assert_no_mutation,
    assert_vmap_matches_loop,
    configs,
    models,
    tokens,
)


def forward_with_mask(params, toks, diagonal: int):
    """gptfn's forward with an explicit mask tril(diagonal): 0 is causal, 1 leaks t+1."""
    x = embed(params, toks, torch.arange(toks.shape[1]))
    mask = torch.ones(toks.shape[1], toks.shape[1], dtype=torch.bool).tril(diagonal)
    for p in params["blocks"]:
        z = attend(*attention_qkv(p["attn"], layer_norm(p["ln_1"], x)), mask=mask)
        x = x + attention_out(p["attn"], z)
        x = x + mlp(p["mlp"], layer_norm(p["ln_2"], x), Context(GPTConfig.from_params(params)))
    return unembed(params, x)


def mixing_forward(params, toks):
    """Adds the batch mean: rows leak into each other."""
    logits = gptfn.forward(params, toks)
    return logits + logits.mean(dim=0, keepdim=True)


def in_place_forward(params, toks):
    """Writes to a parameter in place (by 1.0: the value survives, the write does not)."""
    params["ln_f"]["scale"].mul_(1.0)
    return gptfn.forward(params, toks)


class DroppedTermGelu(torch.autograd.Function):
    """tanh-GELU whose backward forgets the derivative of the tanh."""

    @staticmethod
    def forward(x):
        return F.gelu(x, approximate="tanh")

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        inner = 0.7978845608 * (x + 0.044715 * x**3)
        return grad * 0.5 * (1 + torch.tanh(inner))  # missing: + 0.5 x (1 - tanh^2) inner'


def loss_with_bad_gelu(params, toks, targets):
    x = embed(params, toks, torch.arange(toks.shape[1]))
    for p in params["blocks"]:
        z = attend(*attention_qkv(p["attn"], layer_norm(p["ln_1"], x)))
        x = x + attention_out(p["attn"], z)
        hidden = DroppedTermGelu.apply(layer_norm(p["ln_2"], x) @ p["mlp"]["w_in"])
        x = x + hidden @ p["mlp"]["w_out"]
    return F.cross_entropy(unembed(params, x).flatten(0, 1), targets.flatten())


def branchy_forward(params, toks):
    """Branches on a data-dependent Python value: fine alone, impossible under vmap."""
    logits = gptfn.forward(params, toks)
    return logits * 2 if float(params["wte"].sum()) > 0 else logits


def small_models():  # the broken functions above are GPT-2 code: draw GPT-2 architectures
    return models(
        configs(
            vocab_size=(2, 12),
            block_size=(1, 8),
            n_layer=(1, 1),
            n_head=(1, 2),
            head_size=(1, 4),
            architectures=False,
        )
    )


def grad_models():
    return models(
        configs(
            block_size=(2, 4), n_layer=(1, 1), n_head=(1, 1), head_size=(2, 4), architectures=False
        )
    )


def check_leaky_mask(model, data):
    cfg, params = model
    assert_causal(lambda p, t: forward_with_mask(p, t, 1), params, data.draw(tokens(cfg)))


def check_mixing(model, data):
    cfg, params = model
    assert_batch_independent(mixing_forward, params, data.draw(tokens(cfg, batch=(1, 3))))


def check_in_place(model, data):
    cfg, params = model
    assert_no_mutation(in_place_forward, params, data.draw(tokens(cfg)))


def check_bad_backward(model, data):
    cfg, params = model
    toks = data.draw(tokens(cfg, batch=(1, 2), length=(2, cfg.block_size)))
    assert_grads_match(loss_with_bad_gelu, params, toks, toks, directions=1)


def check_vmap_unsafe(model, data):
    cfg, params = model
    stacked = gptfn.tree.stack([params, params])
    assert_vmap_matches_loop(branchy_forward, stacked, data.draw(tokens(cfg)))


BUGS = {  # name -> (property body, model strategy, expected message)
    "mask sees t+1 (assert_causal)": (check_leaky_mask, small_models, "sees the future"),
    "rows mixed by a batch mean (assert_batch_independent)": (
        check_mixing,
        small_models,
        r"changing row \d+ changed row \d+",
    ),
    "parameter scaled in place (assert_no_mutation)": (
        check_in_place,
        small_models,
        r"args\.0\.ln_f\.scale was modified in place",
    ),
    "backward drops a term (assert_grads_match)": (
        check_bad_backward,
        grad_models,
        "finite difference",
    ),
    "branch on .item() (assert_vmap_matches_loop)": (
        check_vmap_unsafe,
        small_models,
        "assert_vmap_matches_loop: vmap failed",
    ),
}


def property_for(body, strategy):
    """The hypothesis test of one bug."""
    return given(strategy(), st.data())(body)


def examples_to_catch(body, strategy, run_seed: int) -> int | None:
    count = {"n": 0, "first": None}

    def counted(model, data):
        count["n"] += 1
        try:
            body(model, data)
        except AssertionError:
            if count["first"] is None:
                count["first"] = count["n"]
            raise

    test = settings(max_examples=100, phases=[Phase.generate], database=None)(
        seed(run_seed)(given(strategy(), st.data())(counted))
    )
    with contextlib.suppress(AssertionError):
        test()
    return count["first"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"examples generated until the first failure, over {args.seeds} seeds (budget 100)")
    print("| bug (check) | median | worst | caught in |")
    print("| --- | ---: | ---: | ---: |")
    for name, (body, strategy, _) in BUGS.items():
        counts = [examples_to_catch(body, strategy, s) for s in range(args.seeds)]
        caught = [c for c in counts if c is not None]
        print(
            f"| {name} | {statistics.median(caught) if caught else '-'} | "
            f"{max(caught) if caught else '-'} | {len(caught)}/{args.seeds} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
