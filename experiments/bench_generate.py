"""Decode speed: gptfn's KV-cache generation vs Hugging Face ``GPT2LMHeadModel.generate`` on
the same random GPT-2-small-shaped weights (12 layers, 12 heads, 768 wide, vocab 50257), and
cached decoding vs recomputing the full sequence at a 512-token context.

    python experiments/bench_generate.py [--new-tokens 128] [--threads 2] [--reps 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import gptfn
from gptfn.generation import decode_step, generate, init_cache, prefill


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = gptfn.GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    params32 = gptfn.init(cfg, seed=0)
    hf32 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=50257,
            n_positions=1024,
            n_layer=12,
            n_head=12,
            n_embd=768,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
        )
    ).eval()
    hf32.load_state_dict(gptfn.to_hf_gpt2(params32), strict=True)
    gen = torch.Generator().manual_seed(0)
    n = args.new_tokens
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; greedy, prompt "
        f"{args.prompt} tokens, {n} new tokens, median of {args.reps}"
    )
    print("| dtype | batch | gptfn tok/s | HF tok/s | gptfn / HF | same tokens |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for dtype in (torch.float32, torch.bfloat16):
        params = gptfn.tree.cast(params32, dtype)
        hf = hf32.to(dtype)
        for batch in (1, 16):
            prompts = torch.randint(0, 50257, (batch, args.prompt), generator=gen)
            ours_t, hf_t = [], []
            for _ in range(args.reps):
                ours_t.append(timed(lambda: generate(params, prompts.tolist(), n, temperature=0)))
                with torch.no_grad():
                    hf_t.append(
                        timed(
                            lambda: hf.generate(
                                prompts,
                                attention_mask=torch.ones_like(prompts),
                                max_new_tokens=n,
                                min_new_tokens=n,
                                do_sample=False,
                                pad_token_id=0,
                            )
                        )
                    )
            ours = generate(params, prompts[:1].tolist(), 16, temperature=0)[0]
            with torch.no_grad():
                theirs = hf.generate(
                    prompts[:1],
                    attention_mask=torch.ones_like(prompts[:1]),
                    max_new_tokens=16,
                    min_new_tokens=16,
                    do_sample=False,
                    pad_token_id=0,
                )[0, args.prompt :].tolist()
            a, b = batch * n / statistics.median(ours_t), batch * n / statistics.median(hf_t)
            print(
                f"| {str(dtype)[6:]} | {batch} | {a:.1f} | {b:.1f} | {a / b:.2f} | "
                f"{ours == theirs} |",
                flush=True,
            )

    print("\nPer-token cost at a 512-token context (batch 1, fp32): one cached decode step vs")
    print("one full forward over the 512 tokens (what generation without a cache does each step).")
    tokens = torch.randint(0, 50257, (1, 512), generator=gen)
    cache = init_cache(params32, 1, 512)
    with torch.no_grad():
        _, cache = prefill(params32, tokens[:, :511], cache)
        steps, fulls = [], []
        for _ in range(5):
            c = {**cache, "length": 511}
            steps.append(timed(lambda: decode_step(params32, tokens[:, 511:], c)))
            fulls.append(timed(lambda: gptfn.forward(params32, tokens)))
    s, f = statistics.median(steps), statistics.median(fulls)
    print("| cached step (ms) | full recompute (ms) | speed-up |")
    print("| ---: | ---: | ---: |")
    print(f"| {s * 1e3:.1f} | {f * 1e3:.1f} | {f / s:.1f}x |")


if __name__ == "__main__":
    main()
