"""First looks inside a trained model: logit lens, head ablation, attention patterns, induction.

    python experiments/interpretability.py RUN_DIR [--out docs/figures]

On a run from ``gptfn train``: (1) the validation loss of every layer's logit lens, (2) a
heads x layers heatmap of the loss increase when each head is zero-ablated (a patch of
``attn.z``), (3) the attention patterns of a few heads on a prompt, and (4) an induction score
per head (Olsson et al., 2022): on random token sequences (drawn by the text's token
frequencies) repeated twice, the attention from
each token of the repeat to the token right after its earlier occurrence. PNGs plus a table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import gptfn
from gptfn.data import load_tokens
from gptfn.research.interp import logit_lens, run_with_cache, run_with_patches


def heatmap(ax, values: np.ndarray, title: str, cmap: str = "viridis") -> None:
    image = ax.imshow(values, cmap=cmap, aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(values.shape[0]))
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_title(title)
    ax.figure.colorbar(image, ax=ax)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", default="docs/figures")
    parser.add_argument("--prompt", default="ROMEO:\nBut soft, what light through yonder window")
    args = parser.parse_args()
    torch.set_num_threads(2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params, tok, meta = gptfn.load_run(args.run_dir)
    cfg = gptfn.GPTConfig.from_params(params)
    val = load_tokens(meta["data_dir"], "val")
    starts = np.linspace(0, len(val) - cfg.block_size - 2, 16).astype(int)
    windows = torch.from_numpy(
        np.stack([val[s : s + cfg.block_size + 1] for s in starts]).astype(np.int64)
    )
    x, y = windows[:, :-1], windows[:, 1:]

    with torch.no_grad():
        # 1. logit lens
        logits, cache = run_with_cache(params, x, names=lambda n: n.endswith("resid_post"))
        lens = logit_lens(params, cache)
        lens_loss = [float(F.cross_entropy(layer.flatten(0, 1), y.flatten())) for layer in lens]
        base = float(F.cross_entropy(logits.flatten(0, 1), y.flatten()))
        # 2. head ablation
        ablation = np.zeros((cfg.n_layer, cfg.n_head))
        for i in range(cfg.n_layer):
            for h in range(cfg.n_head):

                def zero(z, h=h):
                    z = z.clone()
                    z[:, :, h] = 0
                    return z

                patched = run_with_patches(params, x, {f"blocks.{i}.attn.z": zero})
                ablation[i, h] = float(F.cross_entropy(patched.flatten(0, 1), y.flatten())) - base
        # 3. patterns on a prompt
        prompt = torch.tensor([tok.encode(args.prompt)[: cfg.block_size]])
        _, pcache = run_with_cache(params, prompt, names=lambda n: n.endswith("attn.pattern"))
        # 4. induction scores on repeated random tokens
        half = min(cfg.block_size // 2, 48)
        gen = torch.Generator().manual_seed(0)
        # random tokens drawn by their frequency in the text (uniform ids would be mostly rare
        # punctuation a char model has barely seen), then the same sequence again
        freq = torch.bincount(
            torch.from_numpy(np.asarray(val, dtype=np.int64)), minlength=cfg.vocab_size
        ).double()
        rand = torch.multinomial(freq, 16 * half, replacement=True, generator=gen).view(16, half)
        repeated = torch.cat([rand, rand], dim=1)
        rep_logits, icache = run_with_cache(
            params, repeated, names=lambda n: n.endswith("attn.pattern")
        )
        token_loss = F.cross_entropy(
            rep_logits[:, :-1].transpose(1, 2), repeated[:, 1:], reduction="none"
        )
        copy_losses = (float(token_loss[:, : half - 1].mean()), float(token_loss[:, half:].mean()))
        induction = np.zeros((cfg.n_layer, cfg.n_head))
        queries = torch.arange(half, 2 * half)
        for i in range(cfg.n_layer):
            pattern = icache[f"blocks.{i}.attn.pattern"]  # [batch head query key]
            induction[i] = pattern[:, :, queries, queries - half + 1].mean(dim=(0, 2)).numpy()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(cfg.n_layer), lens_loss, "o-", label="logit lens at resid_post")
    ax.axhline(base, linestyle="--", color="gray", label=f"model output {base:.3f}")
    ax.set_xlabel("layer")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_xticks(range(cfg.n_layer))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "logit_lens.png", dpi=100)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    heatmap(axes[0], ablation, "loss increase when the head is zeroed", "magma")
    heatmap(axes[1], induction, "induction score (repeated random tokens)")
    fig.tight_layout()
    fig.savefig(out / "heads.png", dpi=100)

    shown = [(i, h) for i in range(cfg.n_layer) for h in range(cfg.n_head)]
    shown = [*sorted(shown, key=lambda ih: -induction[ih])[:2], (0, 0), (cfg.n_layer - 1, 0)]
    chars = [tok.decode([t]).replace("\n", "\\n") for t in prompt[0].tolist()]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    for ax, (i, h) in zip(axes, shown):
        ax.imshow(pcache[f"blocks.{i}.attn.pattern"][0, h].numpy(), cmap="Blues")
        ax.set_title(f"layer {i} head {h}")
        ax.set_xticks(range(len(chars)))
        ax.set_xticklabels(chars, fontsize=5)
        ax.set_yticks(range(len(chars)))
        ax.set_yticklabels(chars, fontsize=5)
    fig.tight_layout()
    fig.savefig(out / "patterns.png", dpi=100)

    print(f"model {cfg.n_layer} layers x {cfg.n_head} heads; validation loss {base:.3f}")
    print("| layer | logit-lens loss |\n| ---: | ---: |")
    for i, value in enumerate(lens_loss):
        print(f"| {i} | {value:.3f} |")
    print("\n| layer | head | loss increase when zeroed | induction score |")
    print("| ---: | ---: | ---: | ---: |")
    for i in range(cfg.n_layer):
        for h in range(cfg.n_head):
            print(f"| {i} | {h} | {ablation[i, h]:+.3f} | {induction[i, h]:.3f} |")
    best = np.unravel_index(induction.argmax(), induction.shape)
    print(
        f"\nstrongest induction head: layer {best[0]} head {best[1]} "
        f"(score {induction[best]:.2f}; uniform attention would give ~{1 / half:.2f})"
    )
    print(
        f"loss on the random tokens: first copy {copy_losses[0]:.3f}, repeat {copy_losses[1]:.3f}"
        " (an in-context copying mechanism would make the repeat much cheaper)"
    )
    print(f"wrote {out / 'logit_lens.png'}, {out / 'heads.png'}, {out / 'patterns.png'}")


if __name__ == "__main__":
    main()
