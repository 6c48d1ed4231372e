"""The training loop, in parts that each fit on a screen.

:func:`train` reads top to bottom: set up (data, model, optimizer), resume, then for each step
take the step, log it, and every ``eval_interval`` steps evaluate and write checkpoints; at the
end a summary. In a single process, Ctrl-C (SIGINT) or SIGTERM finishes the current step,
writes ``last.safetensors`` and raises :class:`TrainingInterrupted`; a second one stops at once
(under ``torchrun`` the launcher handles signals, and ``--resume`` continues from the last
checkpoint).
Under ``torchrun`` each rank computes its slice of the same global batch and rank 0 alone
prints, logs and writes.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optree
import torch
import torch.distributed as dist
from torch import Tensor

from gptfn.checkpoint import flat_state, latest_checkpoint, read_meta, save_checkpoint
from gptfn.compiling import frozen_first_call, jit
from gptfn.data import (
    Prefetcher,
    Tokenizer,
    load_meta,
    load_tokenizer,
    load_tokens,
    prepare,
    random_batch,
)
from gptfn.distributed import (
    DistEnv,
    all_reduce_mean,
    assign_owners,
    broadcast_from_owners,
    gather_to_main,
    local_bytes,
    mean_scalar,
    save_dcp,
    setup,
    shard,
    teardown,
)
from gptfn.model import GPTConfig, init
from gptfn.optim import loss_scaling
from gptfn.train.finetune import lora_meta, lora_start, pretrained_start
from gptfn.train.fsdp import fsdp_mesh, load_state, make_sharded_train_step, sharded_loss
from gptfn.train.host_memory import keep_freed_memory, release_freed_memory
from gptfn.train.interrupt import StopSignal, TrainingInterrupted
from gptfn.train.log import TrainLog
from gptfn.train.optimizer_options import make_optimizer, state_clash
from gptfn.train.options import TrainConfig
from gptfn.train.run_dir import check_run_dir, clean_temps, clear_run, trim_log
from gptfn.train.step import make_train_step
from gptfn.tree import Tree, param_count

BUILTIN_DATA = Path("data/shakespeare_char")


@dataclass
class Run:
    """What the loop carries from step to step; the parts below read and update it."""

    cfg: TrainConfig
    env: DistEnv
    run_dir: Path
    data_dir: Path
    tokenizer: Tokenizer
    train_data: np.ndarray
    val_data: np.ndarray
    model_cfg: GPTConfig
    params: Tree
    tx: Any
    opt_state: Tree
    step_fn: Callable
    eval_fn: Callable
    owners: dict[str, int] | None  # ZeRO-1: which rank updates each leaf
    base: Tree | None = None  # LoRA: the frozen model; params are then its adapters
    mesh: Any = None  # --fsdp: the DeviceMesh params, grads and optimizer state are sharded on
    start: int = 0
    best_val: float = math.inf


def train(cfg: TrainConfig, callbacks: list[Callable[[dict], None]] = ()) -> dict[str, Any]:
    """Train a model as ``cfg`` says; returns a summary (run dir, steps, losses, seconds).

    Writes ``last.safetensors`` every ``eval_interval`` steps and at the end,
    ``best.safetensors`` whenever validation improves, and ``log.jsonl``; ``callbacks`` get each
    log record. Refuses a folder that holds a run unless ``cfg.run.resume`` or
    ``cfg.run.overwrite``. Under ``torchrun`` each of the N ranks computes its slice of the same
    global batch (``batch_size * grad_accum * N`` rows, drawn from (seed, step) alone).

    Raises:
      TrainingInterrupted: on SIGINT/SIGTERM (one process, main thread), after saving the last
        finished step.
    """
    env = setup(cfg.run.device, cfg.run.backend, cfg.run.dist_timeout)
    kept = cfg.run.keep_memory and cfg.run.device == "cpu" and keep_freed_memory()
    try:
        return _train(cfg, env, callbacks)
    finally:
        teardown()
        if kept:  # the policy stays; what the run's heap held goes back
            release_freed_memory()


def _train(cfg: TrainConfig, env: DistEnv, callbacks: list[Callable[[dict], None]]) -> dict:
    run = _setup(cfg, env)
    cfg = run.cfg  # with init_from: the pretrained model's architecture filled in
    _resume(run)
    if run.start >= cfg.run.max_steps and env.is_main:
        print(f"the run is at step {run.start} already (--max-steps {cfg.run.max_steps})")
    batches = Prefetcher(lambda step: _batch(run, step), run.start, cfg.run.max_steps)
    log = TrainLog(run.run_dir, cfg, run.start, env.world_size, env.is_main, callbacks)
    stop = StopSignal(active=env.world_size == 1)  # torchrun handles its workers' signals
    try:
        with stop:
            for step, batch in batches:
                metrics = _step(run, step, batch)
                done = step + 1
                log.count()
                is_eval = done % cfg.run.eval_interval == 0 or done == cfg.run.max_steps
                if done % cfg.run.log_interval == 0 or is_eval:
                    record = log.train_record(done, metrics, run.opt_state)
                    if is_eval:
                        record |= _evaluate(run)
                        _save_checkpoints(run, done, record["val_loss"])
                    log.write(record)
                if stop.signum is not None and done < cfg.run.max_steps:  # at the end: finish
                    if not is_eval:
                        _checkpoint(run, run.run_dir / "last.safetensors", done)
                    raise TrainingInterrupted(stop.signum, done, run.run_dir / "last.safetensors")
    finally:
        batches.close()
        log.close()
    return _summary(run, log)


# ----------------------------------------------------------------------------- setup


def _setup(cfg: TrainConfig, env: DistEnv) -> Run:
    """Data, model, optimizer and the compiled (or not) step, ready for step 0."""
    torch.manual_seed(cfg.run.seed)
    run_dir = Path(cfg.run.out)
    check_run_dir(run_dir, cfg.run.resume, cfg.run.overwrite)
    params = None
    if cfg.model.init_from is not None:  # checked before anything is written
        params, cfg = pretrained_start(cfg, env.device)  # and its architecture filled in
    make_optimizer(cfg.optimizer, cfg.run.max_steps)  # a user optimizer's errors: before writing
    if env.is_main:
        _warn_about_settings(cfg, env)
        _data_dir(cfg)  # rank 0 prepares the built-in corpus once, the others wait
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.run.overwrite and (gone := clear_run(run_dir)):
            print(f"--overwrite: deleted {', '.join(gone)} in {run_dir}", flush=True)
        if removed := clean_temps(run_dir):
            print(f"removed {len(removed)} temporary file(s) of an interrupted write", flush=True)
    if env.world_size > 1:
        dist.barrier()
    data_dir = _data_dir(cfg)
    tokenizer = load_tokenizer(data_dir / "tokenizer.json")
    if params is None:  # from scratch
        vocab_size = load_meta(data_dir)["vocab_size"]
        model = cfg.model.gpt_config(vocab_size)
        params = init(model, cfg.run.seed, device=env.device, zero_out_proj=cfg.model.zero_init)
    model_cfg = GPTConfig.from_params(params)
    base, params, loss_fn = lora_start(cfg, params)  # LoRA: train adapters on a frozen base
    mesh = fsdp_mesh(cfg, env)  # --fsdp under torchrun: each rank keeps its shard of everything
    tx, opt_state, owners = _optimizer(cfg, env, params, mesh)
    if mesh is not None:
        params, loss_fn = shard(params, mesh), sharded_loss
    if base is not None and env.is_main:
        _report_lora(base, params, opt_state)
    # --compile: the loss with its backward, as nanoGPT compiles its model; the optimizer runs
    # eagerly in place. On nanoGPT's CPU recipe this starts 2.3x sooner than compiling the whole
    # step and steps as fast as nanoGPT compiled (docs/benchmarks.md, issue 25)
    compiled_loss = _maybe_jit(cfg, loss_fn, "the train loss and its gradient", env)
    step_fn = _make_step(cfg, env, tx, compiled_loss, mesh)
    return Run(
        cfg=cfg,
        env=env,
        run_dir=run_dir,
        data_dir=data_dir,
        tokenizer=tokenizer,
        train_data=load_tokens(data_dir, "train"),
        val_data=load_tokens(data_dir, "val"),
        model_cfg=model_cfg,
        params=params,
        tx=tx,
        opt_state=opt_state,
        step_fn=step_fn,
        eval_fn=_maybe_jit(cfg, loss_fn, "the evaluation", env),
        owners=owners,
        base=base,
        mesh=mesh,
    )


def _make_step(cfg: TrainConfig, env: DistEnv, tx: Any, loss_fn: Callable, mesh: Any) -> Callable:
    """The pure train step: data parallel (gradients all-reduced) or, with a mesh, FSDP's."""
    if mesh is not None:
        make = functools.partial(make_sharded_train_step, tx)
    else:
        reduce = all_reduce_mean if env.world_size > 1 else None
        # donated: the loop keeps only the returned trees, so AdamW updates in place
        make = functools.partial(make_train_step, tx, loss_fn, reduce_grads=reduce, donate=True)
    step = make(
        accum_steps=cfg.data.grad_accum,
        dtype=cfg.run.dtype,
        dropout=cfg.model.dropout,
        remat=cfg.run.remat,
    )
    return frozen_first_call(step) if cfg.run.compile else step  # it compiles the backward too


def _optimizer(
    cfg: TrainConfig, env: DistEnv, params: Tree, mesh: Any = None
) -> tuple[Any, Tree, dict | None]:
    """The run's optimizer (loss-scaled for float16), its state (sharded on ``mesh`` under
    --fsdp), and under ZeRO-1 which rank updates each leaf."""
    sharded = cfg.run.shard_optimizer and env.world_size > 1
    owners = assign_owners(params, env.world_size) if sharded else None
    mine = (lambda path, leaf: owners[path] == env.rank) if sharded else None
    tx = make_optimizer(cfg.optimizer, cfg.run.max_steps, mine)
    tx = loss_scaling(tx) if cfg.run.dtype == "float16" else tx
    opt_state = tx.init(params) if mesh is None else shard(tx.init(params), mesh)
    _report_state_bytes(opt_state, env, "fsdp" if mesh is not None else sharded)
    return tx, opt_state, owners


def _maybe_jit(cfg: TrainConfig, fn: Callable, name: str, env: DistEnv) -> Callable:
    """``fn`` compiled with ``--compile``, one graph (``fullgraph=True``; the gradients'
    all-reduce under torchrun runs outside it); rank 0 prints the warm-up time."""
    if not cfg.run.compile:
        return fn
    report = (lambda line: print(line, flush=True)) if env.is_main else None
    return jit(fn, name, report)


def _warn_about_settings(cfg: TrainConfig, env: DistEnv) -> None:
    if cfg.run.dtype == "float16" and str(env.device).startswith("cpu"):
        warnings.warn(
            "--dtype float16 on a CPU is ~20x slower than float32 (about 1,000 vs 20,000 "
            "tokens/s measured); use float32 or bfloat16",
            stacklevel=3,
        )
    if cfg.run.max_steps <= cfg.optimizer.warmup_steps:
        warnings.warn(
            f"--max-steps ({cfg.run.max_steps}) <= --warmup-steps "
            f"({cfg.optimizer.warmup_steps}): the learning rate only warms up and never decays; "
            "lower --warmup-steps",
            stacklevel=3,
        )


def _data_dir(cfg: TrainConfig) -> Path:
    if cfg.data.data is not None:
        return Path(cfg.data.data)
    if not (BUILTIN_DATA / "meta.json").is_file():
        print(f"preparing the built-in Shakespeare corpus in {BUILTIN_DATA} ...", flush=True)
        prepare(None, BUILTIN_DATA, tokenizer="char", overwrite=True)  # none, or incomplete
    return BUILTIN_DATA


def _report_state_bytes(opt_state: Tree, env: DistEnv, sharded: bool | str) -> None:
    """Under torchrun, print the optimizer-state MiB each rank holds (its shards only)."""
    if env.world_size == 1:
        return
    per_rank = [0] * env.world_size
    own = local_bytes(opt_state)
    dist.all_gather_object(per_rank, own)
    if env.is_main:
        sizes = ", ".join(f"{b / 2**20:.2f}" for b in per_rank)
        kind = sharded if isinstance(sharded, str) else "sharded" if sharded else "replicated"
        print(f"optimizer state per rank (MiB): {sizes} ({kind})", flush=True)


def _report_lora(base: Tree, adapters: Tree, opt_state: Tree) -> None:
    """What LoRA trains: adapter parameters against the frozen model's, and the optimizer
    state's bytes (it holds the adapters' moments only)."""
    state = sum(x.numel() * x.element_size() for x in optree.tree_leaves(opt_state))
    mine, theirs = param_count(adapters), param_count(base)
    print(
        f"LoRA: training {mine:,} adapter parameters ({100 * mine / theirs:.2f}% of the frozen "
        f"model's {theirs:,}); optimizer state {state / 2**20:.2f} MiB",
        flush=True,
    )


# ----------------------------------------------------------------------------- resume


def _resume(run: Run) -> None:
    """With ``resume``, continue from ``last.safetensors`` when it exists. The data, the
    model and the optimizer settings that shape its state are compared first (clear errors),
    then the optimizer state is loaded. An ``--fsdp`` run's ``last.dcp`` folder is read too,
    at any world size, sharded or not."""
    last = latest_checkpoint(run.run_dir)
    if not run.cfg.run.resume:
        return
    if not last.exists():
        if run.env.is_main:
            trim_log(run.run_dir, 0)  # a log without a checkpoint: nothing of it is kept
        return
    saved = read_meta(last)
    if saved.get("tokenizer") != run.tokenizer.to_json():
        there = saved.get("model", {}).get("vocab_size")
        raise ValueError(
            f"cannot resume: {last} was trained on data with another tokenizer than "
            f"{run.data_dir} (vocabulary {there} there, {run.model_cfg.vocab_size} here)"
        )
    was = saved.get("train", {}).get("recipe", "gpt2")  # runs from before recipes: gpt2's
    if was != run.cfg.run.recipe:
        raise ValueError(
            f"cannot resume: {last} was trained with --recipe {was}, this run has --recipe "
            f"{run.cfg.run.recipe}; add --recipe {was} (and the options that run was given)"
        )
    before, now = saved.get("model", {}), run.model_cfg.to_dict()
    with contextlib.suppress(TypeError, ValueError):  # older files: fewer fields, fill defaults
        before = GPTConfig.from_dict(before).to_dict()
    diff = [
        f"{k} {before.get(k)} there, {now.get(k)} here"
        for k in sorted(set(before) | set(now))
        if before.get(k) != now.get(k)
    ]
    if diff:
        raise ValueError(f"cannot resume: {last} holds another model ({'; '.join(diff)})")
    if (rows := saved.get("global_batch", _global_batch(run))) != _global_batch(run):
        raise ValueError(
            f"cannot resume: {last} was trained with a global batch of {rows} rows, this run "
            f"has {_global_batch(run)} (--batch-size x --grad-accum x ranks); keep the product"
        )
    if clash := state_clash(saved.get("train", {}), run.cfg.optimizer):
        flag, there, here = "--" + clash[0].replace("_", "-"), *clash[1:]
        raise ValueError(
            f"cannot resume: {last} was trained with {flag} {there}, this run asks for "
            f"{flag} {here}; give {flag} {there} to continue it"
        )
    sharded = run.owners is not None
    template = run.params if run.base is not None else None  # LoRA: the adapters' structure
    params, opt_state, saved = load_state(
        last, run.params, run.opt_state, run.env.device, sharded, params_template=template
    )
    run.params, run.opt_state = params, opt_state
    run.start, run.best_val = saved["step"], saved.get("best_val_loss", math.inf)
    if run.env.is_main:
        trim_log(run.run_dir, run.start)
        print(f"resuming from {last} at step {run.start}", flush=True)


def _global_batch(run: Run) -> int:
    """Rows per optimizer step over all ranks: a resume must keep it (same trajectory)."""
    return run.cfg.data.batch_size * run.cfg.data.grad_accum * run.env.world_size


# ----------------------------------------------------------------------------- the step


def _batch(run: Run, step: int) -> tuple[Tensor, Tensor]:
    """This rank's rows of step ``step``'s global batch (a function of (seed, step) only)."""
    rows, env = run.cfg.data.batch_size * run.cfg.data.grad_accum, run.env
    x, y = random_batch(
        run.train_data, rows * env.world_size, run.cfg.model.block_size, run.cfg.run.seed, step
    )
    mine = slice(env.rank * rows, (env.rank + 1) * rows)
    return x[mine].to(env.device), y[mine].to(env.device)


def _step(run: Run, step: int, batch: Any) -> dict[str, float]:
    """One optimizer step; returns its metrics (the loss averaged over ranks). A non-finite
    loss stops training and keeps the last good checkpoint."""
    cfg, env = run.cfg, run.env
    torch.manual_seed((cfg.run.seed * 1_000_003 + step) * 1024 + env.rank)  # dropout
    params, opt_state, metrics = run.step_fn(run.params, run.opt_state, batch)
    train_loss = mean_scalar(float(metrics["loss"]))
    if not math.isfinite(train_loss) and cfg.run.dtype != "float16":
        last = run.run_dir / "last.safetensors"
        raise FloatingPointError(
            f"non-finite loss ({train_loss}) at step {step + 1}; stopping. The last good "
            f"checkpoint is kept at {last if last.is_file() else '(none yet)'}"
        )
    if run.owners is not None:  # ZeRO-1: each rank updated its own leaves; share them
        params = broadcast_from_owners(params, run.owners)
    run.params, run.opt_state = params, opt_state
    return {"train_loss": train_loss, "grad_norm": float(metrics["grad_norm"])}


# ----------------------------------------------------------------------------- evaluate, save


def _evaluate(run: Run) -> dict[str, float]:
    """Validation loss on ``eval_steps`` fixed random batches (the same ones at every eval)."""
    cfg = run.cfg
    with torch.no_grad():
        losses = [
            float(
                run.eval_fn(
                    run.params,
                    *random_batch(
                        run.val_data,
                        cfg.data.batch_size,
                        cfg.model.block_size,
                        cfg.run.seed + 1,
                        i,
                        run.env.device,
                    ),
                )
            )
            for i in range(cfg.run.eval_steps)
        ]
    val = sum(losses) / len(losses)
    return {"val_loss": val, "val_perplexity": math.exp(val)}


def _save_checkpoints(run: Run, step: int, val_loss: float) -> None:
    """``best.safetensors`` when validation improved, then ``last.safetensors``."""
    if val_loss < run.best_val:
        run.best_val = val_loss
        _checkpoint(run, run.run_dir / "best.safetensors", step)
    _checkpoint(run, run.run_dir / "last.safetensors", step)


def _checkpoint(run: Run, path: Path, step: int) -> None:
    """Write params, the full optimizer state (gathered from the shards) and metadata; an
    ``--fsdp`` run writes a DCP folder (``last.dcp``) from every rank instead."""
    flat = flat_state(run.opt_state) if run.mesh is None else {}
    full_state = gather_to_main(flat) if run.owners is not None else flat
    if not run.env.is_main and run.mesh is None:
        return
    meta = {
        "step": step,
        "model": run.model_cfg.to_dict(),
        "train": run.cfg.flat(),
        "tokenizer": run.tokenizer.to_json(),
        "best_val_loss": run.best_val,
        "data_dir": str(run.data_dir.resolve()),
        "global_batch": _global_batch(run),
    }
    if run.base is not None:
        meta["lora"] = lora_meta(run.cfg)
    if run.mesh is not None:
        save_dcp(path.with_suffix(".dcp"), run.params, run.opt_state, meta)
        return
    save_checkpoint(path, run.params, None, meta, flat_opt=full_state)


# ----------------------------------------------------------------------------- summary


def _summary(run: Run, log: TrainLog) -> dict[str, Any]:
    """What ``train`` returns: where the run is, how it ended, how long it took."""
    return {
        "rank": run.env.rank,
        "run_dir": str(run.run_dir),
        "steps": run.cfg.run.max_steps,
        "best_val_loss": run.best_val,
        "last": log.last,
        "seconds": log.seconds(),
        "params": param_count(run.params),
    }
