"""Every setting of a training run, in four sections: model, optimizer, data, run.

Each field has one line of help and its allowed values (``gptfn.settings.option``); ``gptfn train
--help`` prints them, and the flags, a TOML file and Python all go through the same checks. The
names are the flag names: ``n_layer`` is ``--n-layer`` and the TOML key ``n-layer`` (or
``n_layer``), at the top level or in its section's table (``[model]``, ``[optimizer]``...).

The ``model`` section is derived from ``GPTConfig``: every architecture field (its help, allowed
values and checks) is an option with no edit here; only the training-only options
(``TRAINING_ONLY``) and the default size (``TRAINING_DEFAULTS``) are declared here.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from gptfn.model import GPTConfig
from gptfn.settings import OptionError, check_option, check_options, option
from gptfn.train.optimizer_options import OptimizerConfig

DEVICES = ("cpu", "cuda", "mps")
DTYPES = ("float32", "bfloat16", "float16")


COMPILE_FLOOR = (
    2,
    12,
)  # measured: 2.4-2.5 fail to compile the step; 2.6-2.11 leave params unchanged


def torch_version() -> tuple[int, int]:
    """The running PyTorch's (major, minor)."""
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _compile_works(on: bool) -> str | None:
    """Why ``--compile`` cannot be used with this PyTorch, or None."""
    if on and torch_version() < COMPILE_FLOOR:
        import torch

        return (
            f"torch.compile of the training step needs PyTorch {'.'.join(map(str, COMPILE_FLOOR))}"
            f" or newer (this is {torch.__version__}; older ones fail to compile it or train "
            "nothing)"
        )
    return None


def _available(device: str) -> str | None:
    """Why ``device`` cannot be used here, or None."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available here (no GPU, or a CPU build of torch); use cpu"
    if device == "mps" and not torch.backends.mps.is_available():
        return "MPS (Apple GPU) is not available here; use cpu"
    return None


def _mesh_shape(spec: str) -> str | None:
    """Why ``spec`` is not a ``--mesh`` shape (REPLICASxSHARDS), or None."""
    parts = (spec or "1x1").lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        return "expected REPLICASxSHARDS, e.g. 2x2 (replicate over 2 groups of 2 shards)"
    return None


class _ModelSection:
    """The architecture (every ``GPTConfig`` field but the vocabulary size, which the data
    decides) and how training starts (dropout, zero-init, a pretrained model). Options left
    unset take GPTConfig's derived defaults."""

    def __post_init__(self) -> None:
        check_options(self)
        try:
            self.gpt_config(vocab_size=2)  # GPTConfig's checks of fields together
        except OptionError as err:
            raise OptionError(err.name.removeprefix("GPTConfig."), err.value, err.problem) from None
        if self.lora_rank and self.init_from is None:
            raise OptionError(
                "lora_rank", self.lora_rank, "LoRA adapts a pretrained model: give --init-from"
            )

    def architecture(self) -> dict[str, Any]:
        """The fields that describe the architecture, by their ``GPTConfig`` names."""
        return {name: getattr(self, name) for name in ARCHITECTURE}

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        """The model's ``GPTConfig``: every architecture field of this section, by name."""
        return GPTConfig(vocab_size=vocab_size, **self.architecture())


TRAINING_DEFAULTS = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128}
"""A small model trains by default; GPTConfig itself has no default size."""

TRAINING_ONLY = {
    "dropout": (float, option(0.0, "dropout probability while training", low=0, below=1)),
    "zero_init": (
        bool, option(False, "start the residual output projections (w_o, w_out) at zero")
    ),
    "init_from": (
        str | None,
        option(
            None, "fine-tune this pretrained model (Hugging Face folder or cached id); its "
            "architecture is used and its tokenizer must be the data's"
        ),
    ),
    "lora_rank": (
        int,
        option(
            0, "with init_from: train LoRA adapters of this rank on the frozen model (0: train "
            "every weight)", low=0,
        ),
    ),
    "lora_alpha": (float, option(16.0, "LoRA's alpha: updates are (alpha / rank) B A", above=0)),
    "lora_targets": (
        str,
        option(
            "q,v", "the weights LoRA adapts, comma-separated: q, k, v, o, qkv (attention), "
            "gate, in, out (MLP), unembed", check=lambda text: lora_targets_problem(text),
        ),
    ),
}  # fmt: skip
"""Model options that are not the architecture: how training starts and runs."""


LORA_TARGETS = {
    "q": "w_q", "k": "w_k", "v": "w_v", "o": "w_o", "qkv": "w_qkv", "gate": "w_gate",
    "in": "w_in", "out": "w_out", "unembed": "unembed",
}  # fmt: skip
"""``--lora-targets`` names (``w_q`` etc. are accepted too) -> the tree's weight names."""


def lora_targets(text: str) -> tuple[str, ...]:
    """The tree's weight names of a ``--lora-targets`` value (``"q,v"`` -> ``w_q, w_v``)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    return tuple(LORA_TARGETS.get(name, name) for name in names)


def lora_targets_problem(text: str) -> str | None:
    """Why ``text`` is not a list of LoRA targets, or None."""
    names = lora_targets(text)
    bad = [n for n in names if n not in LORA_TARGETS.values()]
    if not names or bad:
        return f"comma-separated names from {', '.join(LORA_TARGETS)}" + (
            f"; unknown: {', '.join(bad)}" if bad else ""
        )
    return None


def _architecture_fields() -> list[tuple[str, Any, Any]]:
    """Every ``GPTConfig`` field but ``vocab_size``, with GPTConfig's help and checks."""
    hints = typing.get_type_hints(GPTConfig)
    out = []
    for f in fields(GPTConfig):
        if f.name == "vocab_size":
            continue
        default = TRAINING_DEFAULTS.get(f.name, f.default)
        out.append((f.name, hints[f.name], field(default=default, metadata=f.metadata)))
    return out


ARCHITECTURE = tuple(name for name, _, _ in _architecture_fields())
ModelOptions = dataclasses.make_dataclass(
    "ModelOptions",
    [*_architecture_fields(), *((name, *spec) for name, spec in TRAINING_ONLY.items())],
    bases=(_ModelSection,),
    namespace={"__doc__": _ModelSection.__doc__, "__module__": __name__},
)
"""The ``model`` section: derived from ``GPTConfig``'s fields, so a new architecture option is a
flag and a TOML key with no edit here."""


@dataclass
class DataOptions:
    """Where the tokens come from and how many each step sees."""

    data: str | None = option(None, "prepared data directory (default: the built-in corpus)")
    batch_size: int = option(32, "sequences per micro-batch on each process", low=1)
    grad_accum: int = option(1, "micro-batches averaged into one step", low=1)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class RunOptions:
    """How long, where, on what, how often to evaluate and save."""

    out: str = option("runs/shakespeare-char", "run directory: checkpoints and log.jsonl")
    max_steps: int = option(2500, "training steps (the cosine decay ends here)", low=1)
    eval_interval: int = option(250, "evaluate and write checkpoints every this many steps", low=1)
    eval_steps: int = option(20, "validation batches per evaluation", low=1)
    log_interval: int = option(10, "log (and print) a record every this many steps", low=1)
    seed: int = option(1337, "seeds the init, the batches and dropout", low=0)
    resume: bool = option(False, "continue from OUT/last.safetensors when it exists")
    overwrite: bool = option(False, "delete an existing run in OUT and start afresh")
    device: str = option("cpu", "cpu, cuda or mps", choices=DEVICES, check=_available)
    dtype: str = option(
        "float32", "autocast dtype (float16 on a CPU is ~20x slower)", choices=DTYPES
    )
    compile: bool = option(
        False,
        "torch.compile the loss with its backward (PyTorch 2.12 or newer)",
        check=_compile_works,
    )
    remat: bool = option(False, "recompute activations in the backward: less memory, more time")
    keep_memory: bool = option(
        True,
        "on a CPU (Linux, glibc): keep the memory a step frees for the next step rather than "
        "return it to the system (fewer page faults; see gptfn.train.keep_freed_memory)",
    )
    backend: str = option(
        "auto", "torchrun backend (auto: nccl on CUDA, else gloo)", choices=("auto", "gloo", "nccl")
    )
    dist_timeout: float = option(
        300.0, "seconds before a silent torchrun peer is an error", above=0
    )
    shard_optimizer: bool = option(
        False, "under torchrun, each rank keeps 1/N of the optimizer state (ZeRO-1)"
    )
    fsdp: bool = option(
        False, "under torchrun, shard params, grads and optimizer state over ranks (FSDP)"
    )
    mesh: str = option(
        "",
        "with --fsdp: RxS ranks, replicate over R, shard over S (hybrid, e.g. 2x2; default 1xN)",
        check=_mesh_shape,
    )
    progress: bool = option(True, "a progress bar (without: one printed line per log record)")
    sample_tokens: int = option(
        300, "print a sample of this many tokens at the end (0: none)", low=0
    )
    recipe: str = option(
        "speedrun",
        "a set of defaults: speedrun (rotary, Muon...; see RECIPES) or gpt2 (the 2019 recipe); "
        "options given by name override it",
        choices=("speedrun", "gpt2"),
    )

    def __post_init__(self) -> None:
        check_options(self)
        if self.resume and self.overwrite:
            raise OptionError("overwrite", True, "cannot be combined with resume")


@dataclass
class TrainConfig:
    """Everything ``gptfn train`` can set. The defaults are the ``speedrun`` recipe
    (:data:`RECIPES`); ``replace(recipe="gpt2")`` gives the 2019 recipe, and options given by
    name win over either.

    Build one from flat names with :meth:`from_dict` (``TrainConfig.from_dict({"n_layer": 2})``)
    and change one with :meth:`replace`; read a setting as ``cfg.model.n_layer``.
    """

    model: ModelOptions = field(default_factory=lambda: recipe_section("model"))
    optimizer: OptimizerConfig = field(default_factory=lambda: recipe_section("optimizer"))
    data: DataOptions = field(default_factory=lambda: recipe_section("data"))
    run: RunOptions = field(default_factory=lambda: recipe_section("run"))
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    """The options set by name through :meth:`replace` / :meth:`from_dict` (flags, TOML): with
    ``init_from`` an architecture option the user gave must agree with the pretrained model."""

    SECTIONS: ClassVar[dict[str, type]] = {
        "model": ModelOptions,
        "optimizer": OptimizerConfig,
        "data": DataOptions,
        "run": RunOptions,
    }

    @classmethod
    def section_of(cls, name: str) -> str | None:
        """The section that holds option ``name`` (underscores), or None."""
        return _OWNER.get(name)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str | None = None) -> TrainConfig:
        """A config from option names (flag names, ``-`` or ``_``), at the top level or in
        section tables ``{"model": {...}}``; every value checked. ``source`` (a file name)
        starts each error message."""
        return cls().replace(source=source, **_flatten(values, source))

    def replace(self, source: str | None = None, **values: Any) -> TrainConfig:
        """A copy with the options ``values`` (flat names) changed, checked."""
        where = f"{source}: " if source else ""
        changes: dict[str, dict[str, Any]] = {name: {} for name in self.SECTIONS}
        for name, value in _with_recipe(values, self.given).items():
            section = _OWNER.get(name)
            if section is None:
                raise ValueError(f"{where}unknown option {name!r}; valid: {', '.join(_OWNER)}")
            if name == "resume" and value in ("auto", "no"):
                value = value == "auto"
            try:
                changes[section][name] = check_option(self.SECTIONS[section], name, value)
            except OptionError as err:
                raise OptionError(f"{where}{name}", err.value, err.problem) from None
        try:
            return TrainConfig(
                **{
                    name: dataclasses.replace(getattr(self, name), **changes[name])
                    for name in self.SECTIONS
                },
                given=self.given | set(values),
            )
        except OptionError as err:
            raise OptionError(f"{where}{err.name}", err.value, err.problem) from None

    def flat(self) -> dict[str, Any]:
        """``{option: value}`` over all sections (JSON-ready)."""
        return {
            k: v
            for name in self.SECTIONS
            for k, v in dataclasses.asdict(getattr(self, name)).items()
        }


_OWNER = {f.name: name for name, cls in TrainConfig.SECTIONS.items() for f in fields(cls)}
assert len(_OWNER) == sum(len(fields(c)) for c in TrainConfig.SECTIONS.values()), "names clash"


RECIPES: dict[str, dict[str, Any]] = {
    "speedrun": {  # measured option by option: docs/benchmarks.md, "Speedrun (issue 16)"
        "position": "rotary",
        "qk_norm": True,
        "tie_embeddings": False,
        "optimizer": "muon",
        "muon_lr": 0.05,
        "muon_momentum_warmup": 300,
        "warmup_steps": 50,
        "max_steps": 1000,
    },
}
"""Each recipe's values, by option name. ``speedrun`` (the default) is what paid on the
built-in corpus on 2 CPU cores; ``gpt2`` (the 2019 recipe: GPT-2 blocks, AdamW, warm-up and
cosine, 2,500 steps) is every option at its section's own default."""
RECIPES["gpt2"] = {
    name: next(f.default for f in fields(TrainConfig.SECTIONS[_OWNER[name]]) if f.name == name)
    for name in RECIPES["speedrun"]
}


def recipe_section(section: str, recipe: str = "speedrun") -> Any:
    """Section ``section`` of the default config: its class's defaults with ``recipe``'s."""
    values = {k: v for k, v in RECIPES[recipe].items() if _OWNER[k] == section}
    return TrainConfig.SECTIONS[section](**values)


def _with_recipe(values: dict[str, Any], given: frozenset[str]) -> dict[str, Any]:
    """``values`` with, when they name a ``recipe``, that recipe's values for every option
    not given by name (here or before)."""
    recipe = values.get("recipe")
    if recipe not in RECIPES:
        return values  # no recipe, or a bad name that check_option reports
    mine = {k: v for k, v in RECIPES[recipe].items() if k not in given and k not in values}
    return {"recipe": recipe} | mine | values


def _flatten(values: dict[str, Any], source: str | None) -> dict[str, Any]:
    where = f"{source}: " if source else ""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in TrainConfig.SECTIONS and isinstance(value, dict):
            for inner, item in value.items():
                inner_name = inner.replace("-", "_")
                owner = _OWNER.get(inner_name)
                if owner is not None and owner != name:
                    raise ValueError(f"{where}key {inner!r} belongs in [{owner}], not [{name}]")
                flat[inner_name] = item
        elif name == "config":
            raise ValueError(f"{where}key 'config': a config file cannot name another")
        else:
            flat[name] = value
    return flat


def load_toml(path: str | Path) -> dict[str, Any]:
    """The raw table of a TOML file; a syntax error names the file, line and column."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None
