"""Step time of gptfn's functional training step vs a plain nn.Module GPT + torch.optim.AdamW.

Both models start from the same weights and see the same batches; the two steps alternate in one
loop so they share the machine's noise, which of them goes first flipped each step (the one
after the other finds the caches and the heap as its peer left them). Prints a table of median
step times and their ratio, and each step's minor page faults (pages the step touched fresh).
The process keeps its heap as ``gptfn train`` on a CPU does (``keep_freed_memory``; with
``--give-back``, glibc's default, whichever step frees last may have its pages trimmed and
fault them back in: 2,000-5,600 faults a step on one side or the other).

    python experiments/bench_train.py [--steps 30] [--threads 2] [--compile] [--give-back]
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import gptfn
import gptfn.optim as optim
from gptfn.train import keep_freed_memory, make_train_step


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.h = h
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class ModuleGPT(nn.Module):
    """A nanoGPT-style module, loaded from a gptfn tree (the same function)."""

    def __init__(self, params: dict) -> None:
        super().__init__()
        cfg = gptfn.GPTConfig.from_params(params)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.load_state_dict(self._state(params))

    @staticmethod
    def _state(params: dict) -> dict:
        sd = {
            "wte.weight": params["wte"],
            "wpe.weight": params["wpe"],
            "ln_f.weight": params["ln_f"]["scale"],
            "ln_f.bias": params["ln_f"]["bias"],
        }
        for i, p in enumerate(params["blocks"]):
            a, m = p["attn"], p["mlp"]
            sd |= {
                f"blocks.{i}.ln_1.weight": p["ln_1"]["scale"],
                f"blocks.{i}.ln_1.bias": p["ln_1"]["bias"],
                f"blocks.{i}.ln_2.weight": p["ln_2"]["scale"],
                f"blocks.{i}.ln_2.bias": p["ln_2"]["bias"],
                f"blocks.{i}.qkv.weight": torch.cat(
                    [a[n].flatten(1) for n in ("w_q", "w_k", "w_v")], 1
                ).T,
                f"blocks.{i}.qkv.bias": torch.cat([a[n].flatten() for n in ("b_q", "b_k", "b_v")]),
                f"blocks.{i}.proj.weight": a["w_o"].flatten(0, 1).T,
                f"blocks.{i}.proj.bias": a["b_o"],
                f"blocks.{i}.fc.weight": m["w_in"].T,
                f"blocks.{i}.fc.bias": m["b_in"],
                f"blocks.{i}.out.weight": m["w_out"].T,
                f"blocks.{i}.out.bias": m["b_out"],
            }
        return {k: v.clone().contiguous() for k, v in sd.items()}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T


def module_step(model: ModuleGPT, opt: torch.optim.Optimizer, batch, dtype):
    tokens, targets = batch
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logits = model(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()


def bench(
    cfg: gptfn.GPTConfig, batch_size: int, dtype: torch.dtype, steps: int, compile: bool = False
) -> dict:
    params = gptfn.init(cfg, seed=0)
    model = ModuleGPT(params)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.99),
        foreach=True,
    )
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3, 0.9, 0.99, weight_decay=0.1))
    step = make_train_step(tx, dtype=dtype, donate=True)  # in place, as gptfn train runs it
    if compile:  # the whole gptfn step; the module's forward and backward (optimizer eager)
        step, model = torch.compile(step), torch.compile(model)
    state = tx.init(params)
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"gptfn": [], "module": []}
    faults: dict[str, list[int]] = {"gptfn": [], "module": []}  # minor page faults a step
    losses = {}
    trees = [params, state]

    def gptfn_step(batch) -> float:
        trees[0], trees[1], metrics = step(*trees, batch)
        return float(metrics["loss"])

    runs = {
        "gptfn": gptfn_step,
        "module": lambda batch: module_step(model, opt, batch, dtype).item(),
    }
    for i in range(steps + 4):
        batch = (torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size), generator=g),) * 2
        for name in ("gptfn", "module") if i % 2 == 0 else ("module", "gptfn"):
            f0, t0 = _faults(), time.perf_counter()
            losses[name] = runs[name](batch)
            f1, t1 = _faults(), time.perf_counter()
            if i >= 4:  # warm-up excluded
                times[name].append(t1 - t0)
                faults[name].append(f1 - f0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "gptfn_ms": med["gptfn"] * 1e3,
        "module_ms": med["module"] * 1e3,
        "ratio": med["gptfn"] / med["module"],
        "loss_gap": abs(losses["gptfn"] - losses["module"]),
        "tok_s": batch_size * cfg.block_size / med["gptfn"],
        "faults": {k: statistics.median(v) for k, v in faults.items()},
    }


def _faults() -> int:
    """Minor page faults of this process so far (fresh or reclaimed pages touched)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile both (slow start)")
    parser.add_argument("--give-back", action="store_true", help="glibc's default heap policy")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kept = not args.give_back and keep_freed_memory()  # as gptfn train on a CPU
    gptfn.set_runtime_checks(False)  # the module GPT does not check either
    configs = [  # (name, config, batch)
        ("default 4x128, T=128", gptfn.GPTConfig(75, 128, 4, 4, 128), 32),
        ("6x384, T=256", gptfn.GPTConfig(75, 256, 6, 6, 384), 8),
    ]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps "
        f"(median){', both compiled' if args.compile else ''}, heap "
        f"{'kept (keep_freed_memory)' if kept else 'as the C library does by default'}"
    )
    print(
        "| config | dtype | gptfn ms/step | module ms/step | gptfn/module | gptfn tok/s "
        "| last-loss gap | page faults / step, gptfn / module |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, cfg, batch in configs:
        for dtype in (torch.float32, torch.bfloat16):
            r = bench(cfg, batch, dtype, args.steps, args.compile)
            assert math.isfinite(r["gptfn_ms"])
            print(
                f"| {name}, B={batch} | {str(dtype)[6:]} | {r['gptfn_ms']:.1f} "
                f"| {r['module_ms']:.1f} | "
                f"{r['ratio']:.2f} | {r['tok_s']:.0f} | {r['loss_gap']:.1e} "
                f"| {r['faults']['gptfn']:.0f} / {r['faults']['module']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
