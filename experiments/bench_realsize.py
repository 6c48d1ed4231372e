"""Real size on one machine: a Llama-3.2-1B-shaped bfloat16 model (random weights, made offline
in a temporary folder and removed after) — loading, activation caching, inference and one
training step, gptfn against ``transformers`` on the same weights.

Each measurement of memory runs in a fresh process (peak resident memory from Linux's
``ru_maxrss``, minus the process's size before the measured part); speeds are timed in one
process, the two libraries interleaved. Prints one markdown table per part.

    python experiments/bench_realsize.py                    # everything, ~1.2 B parameters
    python experiments/bench_realsize.py --parts load,infer --layers 2   # smaller, quicker
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import gptfn

SHAPE = dict(  # Llama-3.2-1B: 1.24 B parameters, tied embeddings
    vocab_size=128256, block_size=2048, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048,
    d_mlp=8192, position="rotary", rope_theta=500000.0, norm="rmsnorm", norm_eps=1e-5,
    mlp="swiglu", bias=False, tie_embeddings=True,
)  # fmt: skip


def rss() -> int:
    """Peak resident memory of this process since the last :func:`reset_peak`, bytes."""
    return _status("VmHWM")


def reset_peak() -> int:
    """Start a new peak (Linux's ``clear_refs`` 5); returns the resident bytes now."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def make_folder(root: Path, layers: int, dtype: str) -> Path:
    cfg = gptfn.GPTConfig(**{**SHAPE, "n_layer": layers})
    params = gptfn.init(cfg, seed=0, dtype=getattr(torch, dtype))
    return gptfn.save_pretrained(params, root / f"llama-{layers}-{dtype}")


def worker(part: str, folder: str, option: str) -> dict:
    """One measurement in this (fresh) process; returns JSON-ready figures."""
    torch.set_num_threads(2)
    import transformers  # imported before the baseline, as gptfn is

    del transformers
    before, start = reset_peak(), time.perf_counter()
    if part == "load":
        dtype = None if option.endswith("stored") else torch.bfloat16
        if option.startswith("gptfn"):
            tensors = gptfn.tree.leaves(gptfn.load_pretrained(folder, dtype=dtype))
        else:
            import transformers

            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto")
            tensors = list(model.parameters())
        seconds = time.perf_counter() - start
        for x in tensors:  # read every byte once (memory-mapped weights become resident)
            x.detach().sum()
        nbytes = sum(x.numel() * x.element_size() for x in tensors)
        return {"seconds": seconds, "peak": rss() - before, "bytes": nbytes}
    if part == "cache":
        params = gptfn.load_pretrained(folder)
        for x in gptfn.tree.leaves(params):
            x.sum()  # memory-mapped weights resident, before the measured part
        loaded = reset_peak()
        tokens = torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(0))
        names = None if option == "all" else ["blocks.*.resid_post"]
        with torch.no_grad():
            _, cache = gptfn.run_with_cache(params, tokens, names=names)
        kept = sum(x.numel() * x.element_size() for x in cache.values())
        return {"names": len(cache), "cache_bytes": kept, "peak": rss() - loaded}
    if part == "train":
        return train_step(folder, option)
    raise ValueError(part)


def train_step(folder: str, lib: str) -> dict:
    """One step at sequence 512, batch 1, bf16 autocast, activation checkpointing, AdamW
    (gptfn's step donates its params and moments, updating them in place as torch.optim does)."""
    tokens = torch.randint(0, 1000, (1, 513), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    if lib == "gptfn":
        params = gptfn.load_pretrained(folder, dtype=torch.float32)
        tx = gptfn.optim.adamw(1e-5)
        step = gptfn.make_train_step(tx, dtype="bfloat16", remat=True, donate=True)
        state = tx.init(params)
        loaded = rss()
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            params, state, metrics = step(params, state, (x, y))
            times.append(time.perf_counter() - t0)
        loss = float(metrics["loss"])
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.gradient_checkpointing_enable()
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        loaded = rss()
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x, labels=tokens[:, :-1].clone())
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        loss = float(out.loss)
    return {"seconds": times[-1], "first": times[0], "peak": rss(), "after_load": loaded,
            "loss": loss}  # fmt: skip


def in_fresh_process(part: str, folder: Path, option: str) -> dict:
    command = [sys.executable, __file__, "--worker", part, str(folder), option]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        killed = f"killed by signal {-out.returncode} (out of memory?)"
        return {"error": lines[-1][:120] if lines else killed}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fresh_table(
    title: str, header: list[str], part: str, cases: list[tuple[str, Path]], cells
) -> None:
    """One markdown table: a row per ``(option, folder)`` case, each measured by ``part`` in a
    fresh process, ``cells(result)`` its columns after the first (or the worker's error)."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("| --- |" + " ---: |" * (len(header) - 1))
    for option, folder in cases:
        r = in_fresh_process(part, folder, option)
        row = [r["error"], *[""] * (len(header) - 2)] if "error" in r else cells(r)
        print("| " + " | ".join([option, *row]) + " |")


def stream_seconds(weights: list[torch.Tensor]) -> float:
    """Seconds to read every weight once (a sum over each): the decode step's floor."""
    t0 = time.perf_counter()
    for w in weights:
        w.sum()
    return time.perf_counter() - t0


def timed(generate, prompt: list[int], new: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds per token) of ``generate(prompt, n)``: prefill is
    n=1's time, decoding the rest of n=new+1's."""
    t0 = time.perf_counter()
    generate(prompt, 1)
    t1 = time.perf_counter()
    generate(prompt, new + 1)
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1 - (t1 - t0)) / new


def inference(folder: Path, prefill_len: int, new: int, repeats: int) -> None:
    """Prefill and decode of HF and gptfn (eager, compiled) and the weight-streaming floor,
    interleaved repeat by repeat (the machine's bandwidth varies minute to minute)."""
    import transformers

    torch.set_num_threads(2)
    params = gptfn.load_pretrained(folder)  # stored bfloat16, memory-mapped
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    prompt = torch.randint(0, 1000, (prefill_len,), generator=torch.Generator().manual_seed(0))
    weights = gptfn.tree.leaves(params)

    def hf(p: list[int], n: int) -> None:
        with torch.no_grad():
            model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def ours(compile: bool):
        return lambda p, n: gptfn.generate(params, [p], n, temperature=0, compile=compile)

    t0 = time.perf_counter()
    ours(True)(prompt.tolist(), 2)  # compile the decode graph once
    compile_s = time.perf_counter() - t0
    paths = {"HF generate": hf, "gptfn eager": ours(False), "gptfn compiled": ours(True)}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    floors = []
    for _ in range(repeats):
        for name, fn in paths.items():
            times[name].append(timed(fn, prompt.tolist(), new))
        floors.append(stream_seconds(weights))
    floor = statistics.median(floors)
    weight_bytes = sum(x.numel() * x.element_size() for x in weights)
    print(f"\n### inference, bfloat16, batch 1, prompt {prefill_len}, {new} new tokens, 2 threads")
    print(f"weights {weight_bytes / 1e9:.2f} GB; reading them once: {floor * 1e3:.0f} ms "
          f"({weight_bytes / floor / 1e9:.0f} GB/s, the floor: {1 / floor:.1f} tokens/s); "
          f"compile {compile_s:.0f} s; medians of {repeats} interleaved repeats\n")  # fmt: skip
    print(
        "| path | prefill tokens/s | prefill / HF | decode tokens/s | decode / HF | "
        "decode step / floor |\n| --- | ---: | ---: | ---: | ---: | ---: |"
    )
    hf_pre = statistics.median(t[0] for t in times["HF generate"])
    hf_step = statistics.median(t[1] for t in times["HF generate"])
    for name, pairs in times.items():
        pre, step = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        print(f"| {name} | {prefill_len / pre:.0f} | {hf_pre / pre:.2f} | {1 / step:.2f} | "
              f"{hf_step / step:.2f} | {step / floor:.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="load,cache,infer,train")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    parts = args.parts.split(",")
    root = Path(tempfile.mkdtemp(prefix="gptfn-realsize-"))
    try:
        bf16 = make_folder(root, args.layers, "bfloat16")
        size = sum(f.stat().st_size for f in bf16.iterdir()) / 1e9
        print(f"folder: {args.layers} layers, {size:.2f} GB bfloat16")
        if "load" in parts:
            fp32 = make_folder(root, args.layers, "float32")
            cases = [("gptfn stored", bf16), ("transformers stored", bf16),
                     ("gptfn fp32->bf16", fp32), ("transformers fp32->bf16", fp32)]  # fmt: skip
            fresh_table(
                "load: peak memory / the loaded weights' bytes, seconds (fresh processes)",
                ["load", "peak / weights", "seconds"], "load", cases,
                lambda r: [f"{r['peak'] / r['bytes']:.2f}", f"{r['seconds']:.1f}"],
            )  # fmt: skip
            shutil.rmtree(fp32)
        if "cache" in parts:
            fresh_table(
                "run_with_cache, 1 x 128 tokens: peak memory above the loaded model",
                ["names", "activations kept", "cache MB", "peak MB"], "cache",
                [("blocks.*.resid_post", bf16), ("all", bf16)],
                lambda r: [str(r["names"]), f"{r['cache_bytes'] / 1e6:.0f}",
                           f"{r['peak'] / 1e6:.0f}"],
            )  # fmt: skip
        if "infer" in parts:
            inference(bf16, args.prefill, args.new, args.repeats)
        if "train" in parts:
            fresh_table(
                "one training step: sequence 512, batch 1, bf16 autocast, remat, AdamW",
                ["library", "step s (2nd)", "first step s", "peak GB", "loss"], "train",
                [("gptfn", bf16), ("transformers", bf16)],
                lambda r: [f"{r['seconds']:.1f}", f"{r['first']:.1f}", f"{r['peak'] / 1e9:.2f}",
                           f"{r['loss']:.3f}"],
            )  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
