"""Compiled decoding (issue 15): ``gptfn.generate(..., compile=True)`` against the same call
uncompiled, the GPT-2-small decode step against the weight-streaming floor, and the start-up
cost of compiling (cold, then from torch.compile's on-disk cache in a new process).

    python experiments/bench_compile_decode.py [--reps 5] [--threads 1] [--skip-startup]

Everything timed side by side in one process, interleaved, medians; ratios are what to read on
a shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import gptfn
from gptfn.generation import (
    compiled_steps,
    decode_layout,
    decode_step,
    init_cache,
    prefill,
    sample_from_uniform,
)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def sampling_speed(reps: int, new_tokens: int) -> None:
    """tokens/s of generate, compiled and not, on the default model (4x128, char vocab 65)."""
    print(f"\n## Sampling, default model, {new_tokens} new tokens, temperature 0.8, top-k 20")
    print("| block_size | batch | eager tok/s | compiled tok/s | compiled / eager | same |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for block in (128, 256):  # 128 (the default) slides past the context, as `gptfn sample`
        cfg = gptfn.GPTConfig(vocab_size=65, block_size=block, n_layer=4, n_head=4, n_embd=128)
        params = gptfn.init(cfg, seed=0)
        for batch in (1, 8):
            prompts = [[1]] * batch
            kwargs = dict(temperature=0.8, top_k=20, seed=0, sliding_window=True)
            gptfn.generate(params, prompts, new_tokens, compile=True, **kwargs)  # compile
            times: dict[str, list[float]] = {"eager": [], "compiled": []}
            outs = {}
            for _ in range(reps):
                for name, flag in (("eager", False), ("compiled", True)):
                    t0 = time.perf_counter()
                    outs[name] = gptfn.generate(params, prompts, new_tokens, compile=flag, **kwargs)
                    times[name].append(time.perf_counter() - t0)
            eager, comp = (batch * new_tokens / statistics.median(times[n]) for n in times)
            same = outs["eager"] == outs["compiled"]
            print(
                f"| {block} | {batch} | {eager:.0f} | {comp:.0f} | {comp / eager:.2f}x | {same} |"
            )


def streaming_floor(params: dict) -> float:
    """Seconds to pass one token through every weight matrix once (blocks and unembedding)
    with the matmul the decode step runs on that layout (``torch.mv`` for half-precision
    weights laid out [out, in], else ``F.linear``)."""
    x = torch.randn(1, params["wte"].shape[1], dtype=params["wte"].dtype)
    mats = [params["wte"]]  # the (tied) unembedding, [vocab, d] = [out, in]
    for block in params["blocks"]:
        for group in ("attn", "mlp"):
            for name, w in block[group].items():
                if name.startswith("w_"):  # [in..., out...] as the [out, in] matrix it is
                    inputs = w.shape[0] * (w.shape[1] if name == "w_o" else 1)
                    mats.append(w.reshape(inputs, -1).T)
    t0 = time.perf_counter()
    for w in mats:
        if w.dtype in (torch.bfloat16, torch.float16) and w.is_contiguous():
            torch.mv(w, x[0])
        else:
            torch.nn.functional.linear(x, w)
    return time.perf_counter() - t0


def gpt2_step_vs_floor(reps: int, steps: int) -> None:
    """The compiled decode step of GPT-2-small's shape against the streaming floor."""
    cfg = gptfn.GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    print(f"\n## GPT-2-small shape (random weights), batch 1, cache 256 slots, {steps} steps/rep")
    print("| dtype | floor ms | compiled step ms | step / floor | eager step ms | eager / floor |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    _, decode = compiled_steps()
    for dtype in (torch.float32, torch.bfloat16):
        params = decode_layout(gptfn.tree.cast(gptfn.init(cfg, seed=0), dtype))
        cache = init_cache(params, 1, 256)
        _, cache = prefill(params, torch.ones(1, 128, dtype=torch.long), cache)
        token, uniform, length = torch.ones(1, dtype=torch.long), torch.zeros(1), cache["length"]
        step = {
            "compiled": lambda: decode(params, token, dict(cache, length=length), uniform, 0),
            "eager": lambda: sample_from_uniform(
                decode_step(params, token[:, None], dict(cache, length=length))[0][:, -1],
                uniform,
                0,
            ),
        }
        step["compiled"]()  # compile
        times: dict[str, list[float]] = {"floor": [], "compiled": [], "eager": []}
        for _ in range(reps):
            for _ in range(steps):
                times["floor"].append(streaming_floor(params))
                times["compiled"].append(timed(step["compiled"]))
                times["eager"].append(timed(step["eager"]))
        floor, comp, eager = (statistics.median(times[n]) * 1e3 for n in times)
        print(
            f"| {str(dtype).removeprefix('torch.')} | {floor:.1f} | {comp:.1f} | "
            f"{comp / floor:.2f}x | {eager:.1f} | {eager / floor:.2f}x |"
        )


STARTUP = """
import time, torch, gptfn
torch.set_num_threads({threads})
cfg = gptfn.GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128)
params = gptfn.init(cfg, seed=0)
t0 = time.perf_counter()
gptfn.generate(params, [[1]], 20, temperature=0.8, seed=0, compile={compile})
print(time.perf_counter() - t0)
"""


def startup(threads: int) -> None:
    """First generate call in a fresh process: eager, compiled with an empty compile cache,
    compiled again with the cache the previous process left (a second `gptfn sample`)."""
    print("\n## Start-up: first generate(20 tokens) in a new process, default model")
    print("| run | seconds |")
    print("| --- | ---: |")
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
        for name, flag in (
            ("eager", False),
            ("compiled, cold cache", True),
            ("compiled, warm cache", True),
        ):
            code = STARTUP.format(threads=threads, compile=flag)
            out = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            )
            print(f"| {name} | {float(out.stdout.split()[-1]):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--gpt2-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-startup", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), medians of {args.reps}")
    sampling_speed(args.reps, args.new_tokens)
    gpt2_step_vs_floor(args.reps, args.gpt2_steps)
    if not args.skip_startup:
        startup(args.threads)


if __name__ == "__main__":
    main()
