"""gptfn: a GPT written the JAX way on PyTorch — pytree parameters, pure-function layers."""

from gptfn import optim, tree
from gptfn.checkpoint import load_run
from gptfn.families import from_hf, from_hf_gpt2, to_hf, to_hf_gpt2
from gptfn.generation import generate, generate_stream
from gptfn.model import GPTConfig, forward, init, loss
from gptfn.module import GPTModule
from gptfn.pretrained import load_pretrained, save_pretrained
from gptfn.train import make_train_step
from gptfn.transforms import per_example_grads
from gptfn.typing import runtime_checks_enabled, set_runtime_checks

__all__ = [
    "GPTConfig",
    "GPTModule",
    "forward",
    "from_hf",
    "from_hf_gpt2",
    "generate",
    "generate_stream",
    "load_pretrained",
    "load_run",
    "make_train_step",
    "optim",
    "per_example_grads",
    "init",
    "loss",
    "runtime_checks_enabled",
    "save_pretrained",
    "set_runtime_checks",
    "to_hf",
    "to_hf_gpt2",
    "tree",
]
__version__ = "0.1.0"
