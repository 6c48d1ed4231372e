"""Compiled decoding (issue 15): ``gptfn.generate(..., compile=True)`` against the same call
uncompiled, the GPT-2-small decode step against the weight-streaming floor, and the start-up
cost of compiling (cold, then from torch.compile's on-disk cache in a new process).

    python experiments/bench_compile_decode.py [--reps 5] [--threads 1] [--skip-startup]
        [--baseline DIR]   # also time another gptfn checkout's eager generate (e.g. main)

Everything timed side by side in one process, interleaved, medians of CPU time (one thread by
default: on a shared machine wall time counts the waits for a core); ratios are what to read.
The start-up table is wall time (compiling runs in worker processes).
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
from gptfn import generation  # names used at call time: --baseline runs older checkouts

CLOCK = time.process_time  # CPU seconds: the machine is shared, waiting for a core is not work


def timed(fn) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def default_model(block: int) -> dict:
    cfg = gptfn.GPTConfig(vocab_size=65, block_size=block, n_layer=4, n_head=4, n_embd=128)
    return gptfn.init(cfg, seed=0)


SAMPLING = dict(temperature=0.8, top_k=20, seed=0, roll_context=True)


def baseline_seconds(checkout: str, block: int, batch: int, new_tokens: int) -> float:
    """Seconds of the same eager generate call run by another gptfn checkout (a new process;
    the import is not timed)."""
    args = ["--worker", str(block), str(batch), str(new_tokens)]
    args += ["--threads", str(torch.get_num_threads())]
    env = dict(os.environ, PYTHONPATH=checkout)
    out = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


def worker(block: int, batch: int, new_tokens: int) -> None:
    params, prompts = default_model(block), [[1]] * batch
    gptfn.generate(params, prompts, 2, **SAMPLING)  # warm up
    print(timed(lambda: gptfn.generate(params, prompts, new_tokens, **SAMPLING)))


def sampling_speed(reps: int, new_tokens: int, baseline: str | None) -> None:
    """tokens/s of generate, compiled and not (and of another checkout's generate), on the
    default model (4x128, char vocab 65)."""
    print(f"\n## Sampling, default model, {new_tokens} new tokens, temperature 0.8, top-k 20")
    print("| block_size | batch | baseline tok/s | eager tok/s | compiled tok/s | "
          "compiled / eager | compiled / baseline | same tokens |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for block in (128, 256):  # 128 (the default) slides past the context, as `gptfn sample`
        params = default_model(block)
        for batch in (1, 8):
            prompts = [[1]] * batch
            gptfn.generate(params, prompts, new_tokens, compile=True, **SAMPLING)  # compile
            times: dict[str, list[float]] = {"baseline": [], "eager": [], "compiled": []}
            outs = {}
            for _ in range(reps):
                if baseline:
                    times["baseline"].append(baseline_seconds(baseline, block, batch, new_tokens))
                for name, flag in (("eager", False), ("compiled", True)):
                    t0 = CLOCK()
                    outs[name] = gptfn.generate(
                        params, prompts, new_tokens, compile=flag, **SAMPLING
                    )
                    times[name].append(CLOCK() - t0)
            speed = {n: batch * new_tokens / statistics.median(t) for n, t in times.items() if t}
            base = speed.get("baseline", float("nan"))
            print(
                f"| {block} | {batch} | {base:.0f} | {speed['eager']:.0f} | "
                f"{speed['compiled']:.0f} | {speed['compiled'] / speed['eager']:.2f}x | "
                f"{speed['compiled'] / base:.2f}x | {outs['eager'] == outs['compiled']} |"
            )


def streaming_floor(params: dict) -> float:
    """Seconds to pass one token through every weight matrix once (blocks and unembedding)
    with the matmul the decode step runs on that layout (``torch.mv`` for half-precision
    weights laid out [out, in], else ``F.linear``)."""
    mats = [params["wte"]]  # the (tied) unembedding, [vocab, d] = [out, in]
    for block in params["blocks"]:
        for group in ("attn", "mlp"):
            for name, w in block[group].items():
                if name.startswith("w_"):  # [in..., out...] as the [out, in] matrix it is
                    inputs = w.shape[0] * (w.shape[1] if name == "w_o" else 1)
                    mats.append(w.reshape(inputs, -1).T)
    dtype = params["wte"].dtype
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=dtype) for w in mats}
    t0 = CLOCK()
    for w in mats:
        if w.dtype in (torch.bfloat16, torch.float16) and w.is_contiguous():
            torch.mv(w, xs[w.shape[1]][0])
        else:
            torch.nn.functional.linear(xs[w.shape[1]], w)
    return CLOCK() - t0


def gpt2_step_vs_floor(reps: int, steps: int) -> None:
    """The compiled decode step of GPT-2-small's shape against the streaming floor."""
    cfg = gptfn.GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    print(f"\n## GPT-2-small shape (random weights), batch 1, cache 256 slots, {steps} steps/rep")
    print("| dtype | floor ms | compiled step ms | step / floor | eager step ms | eager / floor |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    _, decode = generation.compiled_steps()
    for dtype in (torch.float32, torch.bfloat16):
        params = generation.decode_layout(gptfn.tree.cast(gptfn.init(cfg, seed=0), dtype))
        cache = generation.init_cache(params, 1, 256)
        _, cache = generation.prefill(params, torch.ones(1, 128, dtype=torch.long), cache)
        token, uniform, length = torch.ones(1, dtype=torch.long), torch.zeros(1), cache["length"]
        step = {
            "compiled": lambda: decode(params, token, dict(cache, length=length), uniform, 0),
            "eager": lambda: generation.sample_from_uniform(
                generation.decode_step(params, token[:, None], dict(cache, length=length))[0][
                    :, -1
                ],
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
    parser.add_argument(
        "--baseline", metavar="DIR", help="also time eager generate of the gptfn checkout in DIR"
    )
    parser.add_argument("--worker", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        return worker(*args.worker)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), medians of {args.reps}")
    sampling_speed(args.reps, args.new_tokens, args.baseline)
    gpt2_step_vs_floor(args.reps, args.gpt2_steps)
    if not args.skip_startup:
        startup(args.threads)


if __name__ == "__main__":
    main()
