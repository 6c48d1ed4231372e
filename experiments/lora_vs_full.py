"""LoRA against full fine-tuning on a small pretrained-shaped model: trainable parameters,
optimizer memory, step time and the loss curves of both.

A Llama-shaped model (rotary, RMSNorm, SwiGLU, grouped-query attention) is first trained for
``--pretrain-steps`` on the first 30 plays of the built-in corpus (character level), standing in
for a pretrained checkpoint. It is then fine-tuned on the last 8 plays (held-out text) twice from
the same weights and on the same batches: every weight with AdamW, and LoRA adapters (rank
``--rank`` on q, v, o, gate, in, out) with AdamW on the adapters only. The two fine-tunes' steps
run interleaved, so the step-time ratio is measured under the same load.

    python experiments/lora_vs_full.py                       # the table in docs/research.md
    python experiments/lora_vs_full.py --pretrain-steps 20 --steps 10   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import optree
import torch

import gptfn
from gptfn import lora
from gptfn.data import CharTokenizer, random_batch, shakespeare
from gptfn.optim import adamw, chain, clip_by_global_norm
from gptfn.train import make_train_step

TARGETS = ("w_q", "w_v", "w_o", "w_gate", "w_in", "w_out")


def corpus(tok: CharTokenizer, text: str) -> np.ndarray:
    return np.asarray(tok.encode(text), dtype=np.int64)


def state_bytes(tree) -> int:
    return sum(x.numel() * x.element_size() for x in optree.tree_leaves(tree))


def pretrain(cfg: gptfn.GPTConfig, data: np.ndarray, steps: int, batch: int) -> dict:
    params = gptfn.init(cfg, seed=0)
    tx = chain(clip_by_global_norm(1.0), adamw(3e-3, weight_decay=0.1))
    step, state = make_train_step(tx), tx.init(params)
    for i in range(steps):
        params, state, metrics = step(
            params, state, random_batch(data, batch, cfg.block_size, 0, i)
        )
        if i % 50 == 0:
            print(f"pretrain step {i}: loss {float(metrics['loss']):.3f}", flush=True)
    return params


def evaluate(params: dict, data: np.ndarray, cfg: gptfn.GPTConfig, batch: int) -> float:
    with torch.no_grad():
        losses = [
            float(gptfn.loss(params, *random_batch(data, batch, cfg.block_size, 99, i)))
            for i in range(10)
        ]
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = shakespeare()
    cut = int(len(text) * 30 / 38)
    tok = CharTokenizer.train(text)
    pre, fine = corpus(tok, text[:cut]), corpus(tok, text[cut:])
    held_out = fine[int(len(fine) * 0.9) :]
    fine = fine[: int(len(fine) * 0.9)]
    cfg = gptfn.GPTConfig(
        vocab_size=tok.vocab_size, block_size=128, n_layer=4, n_head=4, n_embd=128, n_kv_head=2,
        position="rotary", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False,
    )  # fmt: skip
    base = pretrain(cfg, pre, args.pretrain_steps, args.batch)
    print(
        f"held-out loss of the 'pretrained' model: {evaluate(base, held_out, cfg, args.batch):.4f}"
    )

    full_tx = chain(clip_by_global_norm(1.0), adamw(1e-3, weight_decay=0.0))
    lora_tx = chain(clip_by_global_norm(1.0), adamw(3e-3, weight_decay=0.0))
    adapters = lora.init(base, rank=args.rank, alpha=2 * args.rank, targets=TARGETS, seed=0)

    def lora_loss(a, x, y):
        return gptfn.loss(lora.merge(base, a), x, y)

    runs = {
        "full": [make_train_step(full_tx), optree.tree_map(torch.clone, base), None],
        "lora": [make_train_step(lora_tx, lora_loss), adapters, None],
    }
    runs["full"][2] = full_tx.init(runs["full"][1])
    runs["lora"][2] = lora_tx.init(runs["lora"][1])
    memory = {name: state_bytes(run[2]) for name, run in runs.items()}
    trainable = {name: gptfn.tree.param_count(run[1]) for name, run in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    curves: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.steps):
        batch = random_batch(fine, args.batch, cfg.block_size, 1, i)
        for name in ("full", "lora") if i % 2 == 0 else ("lora", "full"):  # interleaved
            step, tree, state = runs[name]
            start = time.perf_counter()
            tree, state, metrics = step(tree, state, batch)
            times[name].append(time.perf_counter() - start)
            runs[name][1:] = [tree, state]
            curves[name].append(float(metrics["loss"]))
        if i % 25 == 0 or i == args.steps - 1:
            print(f"step {i}: full {curves['full'][-1]:.3f}, lora {curves['lora'][-1]:.3f}")
    final = {
        "full": evaluate(runs["full"][1], held_out, cfg, args.batch),
        "lora": evaluate(lora.merge(base, runs["lora"][1]), held_out, cfg, args.batch),
    }
    total = gptfn.tree.param_count(base)
    print("\n| fine-tune | trainable params | optimizer state | step time (median) | "
          "held-out loss after |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in runs:
        share = 100 * trainable[name] / total
        print(
            f"| {name} | {trainable[name]:,} ({share:.1f} %) | {memory[name] / 2**20:.2f} MiB | "
            f"{1000 * statistics.median(times[name][5:]):.1f} ms | {final[name]:.4f} |"
        )
    ratio = statistics.median(times["lora"][5:]) / statistics.median(times["full"][5:])
    share = memory["lora"] / memory["full"]
    print(f"\nLoRA / full: step time {ratio:.2f}, optimizer memory {share:.3f}")
    print("loss every 25 steps (full / lora):")
    for i in range(0, args.steps, 25):
        full, low_rank = (np.mean(curves[name][i : i + 25]) for name in ("full", "lora"))
        print(f"  {i:4d}: {full:.3f} / {low_rank:.3f}")


if __name__ == "__main__":
    main()
