"""lm-evaluation-harness on gptfn parameters: an ``lm_eval`` model over an in-memory tree.

``GPTFNLM(params, tokenizer)`` is an lm-eval ``TemplateLM``: ``loglikelihood`` (multiple-choice
tasks), ``loglikelihood_rolling`` (perplexity tasks) and ``generate_until`` (generative tasks) run
on ``gptfn.forward`` (right-padded batches, sorted by length) and ``gptfn.generate_stream``
(cached, left-padded generation). Tokenization follows lm-eval's own ``HFLM`` rule for rule, so
the two give the same requests the same token ids:

- a text gets the tokenizer's own special tokens (Llama's BOS) unless it already starts with
  the prefix token's text (``tok_encode``; ``HFLM.tok_encode``);
- an empty context becomes the prefix token: ``prefix_token_id`` if given, else BOS, else EOS
  (``prefix_token_id``; ``TemplateLM.loglikelihood``);
- trailing spaces of a context move to the continuation, and the continuation's ids are those of
  ``context + continuation`` past the context's (``TemplateLM._encode_pair``, inherited);
- rolling log-likelihoods score disjoint windows of ``max_length`` tokens built by
  ``lm_eval.utils.get_rolling_token_windows`` (``loglikelihood_rolling``);
- a log-likelihood input keeps the last ``max_length + 1`` tokens of context + continuation
  (``_request_inputs``); a generation prompt keeps its last ``max_length - max_gen_toks``
  (``generate_until``);
- generations stop at EOS or once every row holds a stop string, are decoded without special
  tokens and cut at the first stop string (``_generate_ids``, ``generate_until``).

Importing this module registers the class as lm-eval model ``"gptfn"``, so
``lm_eval.simple_evaluate(model="gptfn", model_args={"pretrained": FOLDER_OR_RUN_DIR})`` works.
``import gptfn`` does not import it (lm-eval is an optional extra: ``pip install 'gptfn[eval]'``).
:func:`evaluate_tasks` and :func:`format_table` are one call each for a command line.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optree
import torch
import torch.nn.functional as F
from tqdm import tqdm

import gptfn

try:
    import transformers
    from lm_eval import evaluator
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (
        Collator,
        handle_stop_sequences,
        has_bos_prefix,
        normalize_gen_kwargs,
        postprocess_generated_text,
    )
    from lm_eval.tasks import TaskManager
except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"gptfn.lm_eval needs lm-evaluation-harness with its Hugging Face extra ({error.name} is "
        "missing): pip install 'gptfn[eval]' (or pip install 'lm-eval[hf]')"
    ) from error


logger = logging.getLogger(__name__)

Params = dict[str, Any]
Request = tuple[Any, list[int], list[int]]  # (request key or None, context ids, continuation ids)


class PlainTokenizer:
    """A gptfn tokenizer with no ``tokenizer.json`` (char; tiktoken's gpt2) behind the small part
    of the ``transformers`` tokenizer interface that :class:`GPTFNLM` uses. It has no special
    tokens: no BOS, no EOS (give ``GPTFNLM`` a ``prefix_token_id`` for empty contexts)."""

    bos_token = eos_token = pad_token = None
    bos_token_id = eos_token_id = pad_token_id = None
    chat_template = None

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.name_or_path = f"gptfn-{tokenizer.to_json().get('kind', 'tokenizer')}"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (there are no special tokens to add)."""
        return list(self.tokenizer.encode(text))

    def decode(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (one id or a list)."""
        return self.tokenizer.decode([ids] if isinstance(ids, int) else list(ids))


def as_hf_tokenizer(tokenizer: Any) -> Any:
    """A ``transformers`` tokenizer for ``tokenizer``.

    Args:
      tokenizer: a ``transformers`` tokenizer (returned as is), a path to a folder or
        ``tokenizer.json`` (loaded with ``AutoTokenizer``), or a gptfn tokenizer: kinds backed by
        a ``tokenizer.json`` (bpe, hf) become a ``PreTrainedTokenizerFast`` with their BOS/EOS;
        the others are wrapped in :class:`PlainTokenizer`.

    Returns:
      An object with ``encode``, ``decode``, ``bos_token(_id)`` and ``eos_token(_id)``.
    """
    if isinstance(tokenizer, (transformers.PreTrainedTokenizerBase, PlainTokenizer)):
        return tokenizer
    if isinstance(tokenizer, (str, Path)):
        path = Path(tokenizer).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"tokenizer {str(tokenizer)!r}: no such file or folder")
        if path.is_file():
            return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
        return transformers.AutoTokenizer.from_pretrained(str(path))
    if not callable(getattr(tokenizer, "to_json", None)):
        raise TypeError(
            f"tokenizer must be a transformers tokenizer, a gptfn tokenizer or a path, got "
            f"{type(tokenizer).__name__}"
        )
    data = tokenizer.to_json()
    if "tokenizer" not in data:
        return PlainTokenizer(tokenizer)
    from tokenizers import Tokenizer

    special = {k: data[k] for k in ("bos_token", "eos_token") if data.get(k)}
    backend = Tokenizer.from_str(json.dumps(data["tokenizer"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``torch.bfloat16`` from ``"bfloat16"`` (or a dtype); None for None / ``"auto"``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype (e.g. bfloat16)")
    return value


def _to(params: Params, device: torch.device, dtype: torch.dtype | None) -> Params:
    """``params`` on ``device``, floating-point leaves cast to ``dtype`` (when given)."""

    def move(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        cast = dtype if dtype is not None and leaf.is_floating_point() else leaf.dtype
        return leaf.to(device=device, dtype=cast)

    return optree.tree_map(move, params, none_is_leaf=True)


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _eos_ids(folder: Path) -> list[int]:
    """The EOS ids a Hugging Face folder's model stops at (``generation_config.json``, else
    ``config.json``), as ``transformers`` generation does."""
    for name in ("generation_config.json", "config.json"):
        file = folder / name
        if file.is_file():
            value = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
            if value is not None:
                return [value] if isinstance(value, int) else list(value)
    return []


def load_model(
    pretrained: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    checkpoint: str = "last",
) -> tuple[Params, Any, list[int]]:
    """Parameters, tokenizer and EOS ids of a Hugging Face model folder or a gptfn run directory.

    Args:
      pretrained: a folder with ``config.json`` and safetensors weights (``gptfn.load_pretrained``;
        a model id in the local Hugging Face cache works too), or a gptfn run directory holding
        ``last.safetensors`` / ``best.safetensors`` (``gptfn.load_run``).
      dtype: cast floating-point weights to it (``"bfloat16"``, a ``torch.dtype``; None or
        ``"auto"``: as stored).
      device: where the tensors go (default: cuda if available, else cpu).
      checkpoint: ``"last"`` or ``"best"``, for run directories.

    Returns:
      ``(params, tokenizer or None, eos ids)``; the tokenizer is the folder's
      (``AutoTokenizer``) or the run's, None when a model folder has none.
    """
    dtype, device = _parse_dtype(dtype), _default_device(device)
    path = Path(pretrained).expanduser()
    if path.is_dir() and (path / f"{checkpoint}.safetensors").is_file():
        params, tokenizer, _ = gptfn.load_run(path, checkpoint)
        return _to(params, device, dtype), tokenizer, []
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"pretrained={str(pretrained)!r} is neither a gptfn run directory (no "
            f"{checkpoint}.safetensors) nor a Hugging Face model folder (no config.json)"
        )
    try:
        params = gptfn.load_pretrained(pretrained, dtype=dtype, device=device)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"pretrained={str(pretrained)!r}: {error}") from None
    # a folder's tokenizer files, or (a model id) the cached ones AutoTokenizer finds
    folder = path if path.is_dir() else None
    has_tokenizer = folder is None or any(
        (folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model")
    )
    source = str(folder or pretrained)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source) if has_tokenizer else None
    return params, tokenizer, [] if folder is None else _eos_ids(folder)


def _batch_size(batch_size: int | str | None, max_batch_size: int | None) -> int:
    """An int batch size from lm-eval's forms ("8", 8, "auto", "auto:4"): "auto" is not
    searched for; it means ``max_batch_size`` (default 64)."""
    if batch_size is None:
        return 16
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        logger.info("batch_size=%s: using max_batch_size (%s)", batch_size, max_batch_size or 64)
        return int(max_batch_size or 64)
    size = int(batch_size) if str(batch_size).isdigit() else 0
    if size < 1:
        raise ValueError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
    return size


@register_model("gptfn")
class GPTFNLM(TemplateLM):
    """An lm-eval model over a gptfn parameter tree (see the module docstring for the
    tokenization rules it shares with lm-eval's ``HFLM``).

    Args:
      params: the tree (``gptfn.init``, ``gptfn.load_pretrained``, a checkpoint), or a path read
        as ``pretrained``.
      tokenizer: a gptfn tokenizer, a ``transformers`` tokenizer or a path to one (default: the
        one that comes with ``pretrained``).
      batch_size: requests per forward pass / generation batch (lm-eval's forms: int, "16",
        "auto" meaning ``max_batch_size``).
      max_length: longest input in tokens (default, and at most, the model's ``block_size``).
      device: where the model runs (default: where ``params`` are; for ``pretrained``, cuda if
        available).
      pretrained: a Hugging Face model folder or a gptfn run directory (lm-eval's keyword form,
        ``model_args={"pretrained": ...}``).
      dtype: cast floating-point weights to it, e.g. ``"bfloat16"``.
      max_batch_size: the batch size that ``batch_size="auto"`` stands for.
      prefix_token_id: the token that stands for an empty context (default BOS, else EOS).
      max_gen_toks: new tokens per generation when a task does not say.
      checkpoint: ``"last"`` or ``"best"`` checkpoint of a run directory.
      compile: generate with ``torch.compile``d prefill and decode steps (the same tokens;
        ``"true"`` as a string works, for ``model_args``).
    """

    def __init__(
        self,
        params: Params | str | Path | None = None,
        tokenizer: Any = None,
        batch_size: int | str | None = 16,
        max_length: int | None = None,
        device: str | torch.device | None = None,
        *,
        pretrained: str | Path | None = None,
        dtype: str | torch.dtype | None = None,
        max_batch_size: int | None = None,
        prefix_token_id: int | None = None,
        max_gen_toks: int = 256,
        checkpoint: str = "last",
        compile: bool = False,
    ) -> None:
        super().__init__()
        self._compile = (
            compile.lower() in ("true", "1", "yes") if isinstance(compile, str) else bool(compile)
        )
        if isinstance(params, (str, Path)):
            params, pretrained = None, params
        if (params is None) == (pretrained is None):
            raise ValueError("give exactly one of params (a gptfn tree) and pretrained (a path)")
        eos_ids: list[int] = []
        if pretrained is not None:
            params, own, eos_ids = load_model(
                pretrained, dtype=dtype, device=device, checkpoint=checkpoint
            )
            tokenizer = own if tokenizer is None else tokenizer
            self.pretrained = str(pretrained)
        else:
            where = device if device is not None else params["wte"].device
            params = _to(params, torch.device(where), _parse_dtype(dtype))
        if tokenizer is None:
            where = f"{pretrained} has none" if pretrained is not None else "none given"
            raise ValueError(f"GPTFNLM needs a tokenizer ({where}): pass tokenizer=")
        if not isinstance(params.get("config"), gptfn.GPTConfig):
            raise ValueError("params must carry their GPTConfig as params['config']")
        self._params: Params = params
        self.tokenizer = as_hf_tokenizer(tokenizer)
        self._device = params["wte"].device
        block_size = params["config"].block_size
        self._max_length = block_size if max_length is None else int(max_length)
        if not 1 < self._max_length <= block_size:
            raise ValueError(
                f"max_length must be in [2, block_size={block_size}], got {max_length}"
            )
        self._batch_size = _batch_size(batch_size, max_batch_size)
        self.custom_prefix_token_id = prefix_token_id
        self._max_gen_toks = int(max_gen_toks)
        stop = [*eos_ids, self.tokenizer.eos_token_id]
        self.stop_token_ids = sorted({t for t in stop if t is not None})

    @property
    def params(self) -> Params:
        """The parameter tree the model runs."""
        return self._params

    @property
    def eot_token_id(self) -> int | None:
        """The tokenizer's EOS id (None when it has none)."""
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token standing for an empty context: ``prefix_token_id``, else BOS, else EOS."""
        for candidate in (
            self.custom_prefix_token_id,
            self.tokenizer.bos_token_id,
            self.tokenizer.eos_token_id,
        ):
            if candidate is not None:
                return candidate
        raise ValueError(
            "this tokenizer has no BOS or EOS token to stand for an empty context (rolling "
            "perplexity and empty-context requests need one): pass prefix_token_id="
        )

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "gptfn")).replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records about the model in ``results["config"]``."""
        leaves = [x for x in optree.tree_leaves(self._params) if isinstance(x, torch.Tensor)]
        return {
            "model_num_parameters": sum(x.numel() for x in leaves),
            "model_dtype": str(self._params["wte"].dtype),
            "gptfn_config": self._params["config"].to_dict(),
        }

    def _prefix_text(self) -> str | None:
        """The prefix token's text, or None when there is no prefix token."""
        try:
            return self.tokenizer.decode([self.prefix_token_id])
        except ValueError:
            return None

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of ``string``, as ``HFLM.tok_encode``: with the tokenizer's special tokens
        unless ``add_special_tokens`` is False, or is None and ``string`` already starts with
        the prefix token's text; the last ``left_truncate_len`` ids when given."""
        if add_special_tokens is None:
            add_special_tokens = not has_bos_prefix(string, self._prefix_text())
        ids = self.tokenizer.encode(string, add_special_tokens=add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: int | Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``tokens``, special tokens dropped by default (as ``HFLM.tok_decode``)."""
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _request_inputs(self, chunk: Sequence[Request]) -> tuple[torch.Tensor, list[int]]:
        """Right-padded inputs [batch, longest] of a chunk of requests and each one's length:
        the last ``max_length + 1`` tokens of context + continuation, less the last token."""
        rows = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in chunk]
        lengths = [len(r) for r in rows]
        inputs = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        for i, row in enumerate(rows):
            inputs[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return inputs.to(self.device), lengths

    @torch.no_grad()
    def _loglikelihood_tokens(
        self,
        requests: Sequence[Request],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """``(log-likelihood of the continuation, whether it is the greedy one)`` per request,
        batched like ``HFLM``: longest first, one-token continuations sharing a context scored
        by one row (``Collator(group_by="contexts")``)."""
        for _, ctx, cont in requests:
            if not ctx or not cont or len(cont) > self.max_length:
                raise ValueError(
                    f"a request needs a context, a continuation, and at most max_length "
                    f"({self.max_length}) continuation tokens; got {len(ctx)} and {len(cont)}"
                )
        order = Collator(
            requests,
            sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
            group_by="contexts",
            group_fn=lambda r: r[-2] + r[-1][:-1],
        )
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="gptfn loglikelihood")
        for chunk in order.get_batched(n=override_bs or self.batch_size):
            inputs, lengths = self._request_inputs(chunk)
            logits = gptfn.forward(self._params, inputs)
            for (key, ctx, cont), logit_row, length in zip(chunk, logits, lengths):
                scored = F.log_softmax(logit_row[length - len(cont) : length].float(), dim=-1)
                for key_, cont_, logp in order.get_cache(
                    req_str=key, cxt_toks=ctx, cont_toks=cont, logits=scored[None]
                ):
                    answer = self._score(logp, cont_)
                    results.append(answer)
                    if key_ is not None:
                        self.cache_hook.add_partial("loglikelihood", key_, answer)
                    bar.update(1)
        bar.close()
        return order.get_original(results)

    @staticmethod
    def _score(logp: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
        """Summed log-probability of ``cont`` under the last ``len(cont)`` rows of ``logp``
        [1, n, vocab], and whether each of its tokens is the argmax."""
        target = torch.tensor(cont, dtype=torch.long, device=logp.device)
        rows = logp[0, -len(cont) :]
        greedy = bool((rows.argmax(dim=-1) == target).all())
        return float(rows.gather(1, target[:, None]).sum()), greedy

    def loglikelihood_rolling(
        self, requests: Sequence[Any], disable_tqdm: bool = False
    ) -> list[float]:
        """Log-likelihood of each whole text (``request.args == (text,)``), summed over disjoint
        windows of ``max_length`` tokens, the first predicted from the prefix token, each later
        one given the tokens before it (``lm_eval.utils.get_rolling_token_windows``)."""
        windows: list[Request] = []
        counts: list[int] = []
        for (text,) in (req.args for req in requests):
            pairs = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            mine = [(None, *lm_utils.make_disjoint_window(p)) for p in pairs]
            windows.extend(mine)
            counts.append(len(mine))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals, start = [], 0
        for req, count in zip(requests, counts):
            total = sum(s for s, _ in scores[start : start + count])
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            start += count
        return totals

    def _sampling(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``gptfn.generate`` keywords from a request's normalised generation kwargs: greedy
        unless ``do_sample`` with a temperature > 0; ``top_k`` / ``top_p`` passed on; anything
        else ignored with a warning."""
        kwargs = dict(kwargs)
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
        if kwargs:
            logger.warning("gptfn ignores these generation kwargs: %s", sorted(kwargs))
        if not do_sample or temperature <= 0:
            return {"temperature": 0.0}
        return {"temperature": temperature, "top_k": top_k, "top_p": top_p}

    def _stopped(self, ids: list[int], until: list[str]) -> bool:
        """Whether a generation is over: it produced a stop token or holds a stop string."""
        if ids and ids[-1] in self.stop_token_ids:
            return True
        text = self.tok_decode(ids, skip_special_tokens=False)
        return any(stop and stop in text for stop in until)

    def _generate_ids(
        self, prompts: list[list[int]], max_new: int, until: list[str], sampling: dict[str, Any]
    ) -> list[list[int]]:
        """New ids per prompt: at most ``max_new``; the batch ends early once every row hit a
        stop token (kept) or holds a stop string (the text is cut at it later)."""
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        if max_new <= 0:
            return new
        stream = gptfn.generate_stream(
            self._params, prompts, max_new, compile=self._compile, **sampling
        )
        for step in stream:
            for i, token in enumerate(step):
                if not done[i] and token is not None:
                    new[i].append(token)
                    done[i] = self._stopped(new[i], until)
            if all(done):
                break
        return new

    def _prompt_ids(self, context: str, max_ctx: int) -> list[int]:
        """A generation prompt as ``HFLM.tok_batch_encode`` makes it: special tokens unless the
        context starts with the BOS text, then its last ``max_ctx`` ids (the prefix token for
        an empty context: a generation needs one token to start from)."""
        bos = getattr(self.tokenizer, "bos_token", None)
        ids = self.tokenizer.encode(context, add_special_tokens=not has_bos_prefix(context, bos))
        return ids[-max_ctx:] if ids else [self.prefix_token_id]

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """The continuation of each ``(context, gen_kwargs)`` request, cut at the first of its
        ``until`` strings (EOS's text added), at most ``max_gen_toks`` tokens; requests batched
        by equal generation kwargs, longest context first."""
        order = Collator(
            [req.args for req in requests],
            sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_by="gen_kwargs",
            group_fn=lambda r: r[1],
        )
        eos = None if self.eot_token_id is None else self.tok_decode([self.eot_token_id], False)
        results: list[str] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="gptfn generate_until")
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = dict(normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            max_ctx = self.max_length - max_new
            if max_ctx <= 0:
                raise ValueError(
                    f"max_gen_toks={max_new} leaves no room for a prompt in max_length="
                    f"{self.max_length} tokens"
                )
            prompts = [self._prompt_ids(c, max_ctx) for c in contexts]
            generated = self._generate_ids(prompts, max_new, until, self._sampling(kwargs))
            for context, ids in zip(contexts, generated):
                text = postprocess_generated_text(self.tok_decode(ids), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                bar.update(1)
        bar.close()
        return order.get_original(results)


def _check_tasks(tasks: Sequence[str], manager: TaskManager, include_path: Any) -> None:
    """A ValueError naming each task ``manager`` does not know (nor a glob or YAML file
    matches), where it looked, and close names."""
    known = manager.all_tasks
    unknown = [
        t
        for t in tasks
        if t not in known and not fnmatch.filter(known, t) and not Path(t).is_file()
    ]
    if not unknown:
        return
    places = [str(p) for p in _as_list(getattr(manager, "include_path", None) or include_path)]
    looked = f"lm-eval's task index ({len(known)} names" + (
        f", include_path {', '.join(places)})" if places else ", no include_path)"
    )
    hints = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
    hint = "; ".join(f"{t!r}: did you mean {', '.join(h)}?" for t, h in hints.items() if h)
    raise ValueError(
        f"unknown lm-eval task(s) {', '.join(map(repr, unknown))}: looked in {looked}"
        + (f" ({hint})" if hint else "")
    )


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def evaluate_tasks(
    params_or_path: Params | str | Path | GPTFNLM,
    tokenizer: Any = None,
    tasks: str | Sequence[str] = (),
    *,
    include_path: str | Path | Sequence[str | Path] | None = None,
    task_manager: TaskManager | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 16,
    max_length: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    log_samples: bool = False,
    **simple_evaluate_kwargs: Any,
) -> dict[str, Any]:
    """Run lm-eval tasks on a gptfn model: ``lm_eval.simple_evaluate`` on a :class:`GPTFNLM`.

    Args:
      params_or_path: a parameter tree, a Hugging Face model folder or gptfn run directory, or
        a ready :class:`GPTFNLM`.
      tokenizer: the model's tokenizer (default: the one beside a path).
      tasks: task, group or tag names (a list, or one comma-separated string); glob patterns
        and YAML files work as in lm-eval.
      include_path: folder(s) of extra task YAML files, e.g. ``tests/data/lm_eval_tasks``.
      task_manager: an existing ``lm_eval.tasks.TaskManager`` (else one is built over the
        built-in tasks and ``include_path``).
      limit: documents per task (an int, or a fraction when < 1).
      num_fewshot: few-shot examples per prompt (default: each task's own).
      batch_size, max_length, device, dtype: as :class:`GPTFNLM`.
      log_samples: keep every request and response in ``results["samples"]``.
      **simple_evaluate_kwargs: passed to ``lm_eval.simple_evaluate`` (``random_seed``,
        ``gen_kwargs``, ``bootstrap_iters`` ...).

    Returns:
      lm-eval's results dict (``results["results"][task][metric]``); :func:`format_table`
      prints it.
    """
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [t for t in names if t]
    if not names:
        raise ValueError("no tasks given")
    if include_path is not None:
        for path in _as_list(include_path):
            if not Path(path).is_dir():
                raise FileNotFoundError(f"include_path {str(path)!r} is not a folder of task YAMLs")
    manager = task_manager or TaskManager(include_path=include_path)
    _check_tasks(names, manager, include_path)
    if isinstance(params_or_path, GPTFNLM):
        lm = params_or_path
    else:
        lm = GPTFNLM(
            params_or_path, tokenizer, batch_size=batch_size, max_length=max_length,
            device=device, dtype=dtype,
        )  # fmt: skip
    return evaluator.simple_evaluate(
        model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
        log_samples=log_samples, **simple_evaluate_kwargs,
    )  # fmt: skip


def format_table(results: dict[str, Any]) -> str:
    """lm-eval's markdown table of ``results`` (from :func:`evaluate_tasks`): one row per task
    and metric, then the groups' table when there are groups."""
    table = lm_utils.make_table(results)
    if results.get("groups"):
        table += "\n" + lm_utils.make_table(results, "groups")
    return table
