"""Pretrained models in Hugging Face's folder format, both ways, from local files.

``load_pretrained(path_or_id)`` reads a folder with ``config.json`` and safetensors weights
(one ``model.safetensors`` or shards listed in ``model.safetensors.index.json``), or a model id
already in the local Hugging Face cache (``huggingface_hub`` resolves it, and downloads only
where the network and the user allow it; ``HF_HUB_OFFLINE=1`` forbids that). Weights are only
ever read from safetensors: gptfn never unpickles. ``save_pretrained`` writes a folder that
``transformers.AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gptfn.data.tokenizers import HFTokenizer, Tokenizer, tokenizer_json
from gptfn.families import family, from_hf, hf_config, to_hf
from gptfn.model import GPTConfig
from gptfn.shapes import Params

_FILES = [
    "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
]  # fmt: skip
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def resolve_pretrained(
    path_or_id: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """The local folder of a model: ``path_or_id`` itself when it is a folder, else the
    snapshot of that model id in the Hugging Face cache (fetched only if allowed)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"{path_or_id} is not a model folder (no such directory)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RuntimeError(
            f"{path_or_id!r} is not a local folder; resolving model ids needs huggingface_hub "
            "(pip install huggingface_hub)"
        ) from None
    try:
        folder = snapshot_download(
            text, revision=revision, cache_dir=cache_dir, allow_patterns=_FILES,
            local_files_only=bool(local_files_only),
        )  # fmt: skip
    except Exception as err:
        raise FileNotFoundError(
            f"{text!r} is neither a local folder nor a model in the Hugging Face cache that "
            f"could be used ({type(err).__name__}: {err})"
        ) from None
    return Path(folder)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for pattern in _PICKLES for p in folder.glob(pattern))
    found = f"it holds only pickled weights ({', '.join(pickles)})" if pickles else "it has none"
    raise FileNotFoundError(
        f"{folder} has no safetensors weights (model.safetensors or model.safetensors.index.json): "
        f"{found}. gptfn never unpickles: loading a pickle can run arbitrary code. Convert once, "
        'in an environment you trust: python -c "from transformers import AutoModelForCausalLM; '
        f"AutoModelForCausalLM.from_pretrained('{folder}')"
        f".save_pretrained('{folder}-safetensors')\" and load the new folder."
    )


def load_pretrained(
    path_or_id: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
) -> Params:
    """A gptfn tree (carrying its ``GPTConfig``) from a Hugging Face model folder or cached id.

    Args:
      path_or_id: a folder with ``config.json`` and safetensors weights, or a model id such as
        ``"HuggingFaceTB/SmolLM2-135M"`` in the Hugging Face cache.
      dtype: floating-point weights in this dtype (default: as stored), converted tensor by
        tensor as they are read: a float32 folder loaded as bfloat16 peaks at the bfloat16
        model plus 64 MiB. As stored, the weights are memory-mapped.
      device: where the tensors go, each as it is read (``"cuda"``; ``"meta"`` reads shapes
        and dtypes only, no data: the tree for planning memory or sharding).
      revision, cache_dir, local_files_only: passed to ``huggingface_hub`` for model ids.

    Returns:
      The parameter tree; ``gptfn.forward(params, tokens)`` runs it.

    Supported ``model_type``s: ``gptfn.families.FAMILIES`` (gpt2, llama, qwen2, gpt_neox,
    mistral, qwen3, olmo2, smollm3, phi3, gemma2, gemma3_text and gemma3's text part).
    """
    folder = resolve_pretrained(
        path_or_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
    )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    hf = json.loads(config_file.read_text(encoding="utf-8"))
    family(
        hf.get("model_type", "<missing>")
    )  # an unsupported model fails before any weight is read
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        if not file.is_file():
            raise FileNotFoundError(f"{file.name}, listed in {folder}'s index, is missing")
        state |= _read_weights(file, dtype, torch.device(device))
    return from_hf(state, hf)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _read_weights(
    file: Path, dtype: torch.dtype | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """One safetensors file's tensors. As stored on the CPU: memory-mapped (nothing is copied
    until used). Otherwise each tensor is read with a plain file read, converted to ``dtype``
    and moved to ``device`` before the next is read, so a float32 file loaded as bfloat16 peaks
    at the bfloat16 model plus 64 MiB (no mapped float32 pages stay resident), and a
    GPU load never holds the model in CPU memory; ``device="meta"`` reads the header only."""
    if dtype is None and device.type == "cpu":
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    out: dict[str, torch.Tensor] = {}
    with open(file, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header, base = json.loads(fh.read(size)), 8 + size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            stored = _SAFETENSORS_DTYPES[info["dtype"]]
            kind = dtype if dtype is not None and stored.is_floating_point else stored
            if device.type == "meta":
                out[name] = torch.empty(info["shape"], dtype=kind, device="meta")
                continue
            fh.seek(base + info["data_offsets"][0])
            out[name] = _read_tensor(fh, info["shape"], stored, kind).to(device)
    return out


_CHUNK_BYTES = 64 * 2**20


def _read_tensor(fh: Any, shape: list[int], stored: torch.dtype, kind: torch.dtype) -> torch.Tensor:
    """The tensor at the file's position, read in chunks of ~64 MiB converted from ``stored`` to
    ``kind`` straight into the result (so converting holds one chunk of the stored dtype)."""
    result = torch.empty(shape, dtype=kind)
    flat = result.view(-1)
    step = max(1, _CHUNK_BYTES // stored.itemsize)
    for start in range(0, flat.numel(), step):
        count = min(step, flat.numel() - start)
        raw = torch.empty(count * stored.itemsize, dtype=torch.uint8)
        fh.readinto(raw.numpy())
        flat[start : start + count] = raw.view(stored)
    return result


def load_pretrained_tokenizer(path_or_id: str | Path, **resolve_kwargs: Any) -> HFTokenizer:
    """The ``tokenizer.json`` of a model folder or cached id, behind gptfn's tokenizer
    interface (offline, through the ``tokenizers`` library)."""
    return HFTokenizer.from_file(resolve_pretrained(path_or_id, **resolve_kwargs))


def _file_tensors(params: Params, model_type: str | None) -> dict[str, torch.Tensor]:
    """The state dict as written to disk: tied unembedding left out (transformers re-ties it),
    contiguous CPU tensors, no two sharing storage (safetensors refuses that)."""
    cfg = GPTConfig.from_params(params)
    fam = family(hf_config(params, model_type)["model_type"])
    renames = getattr(fam, "FILE_NAMES", {})
    out, seen = {}, set()
    for name, tensor in to_hf(params, model_type).items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        t = tensor.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[renames.get(name, name)] = t
    return out


def save_pretrained(
    params: Params,
    path: str | Path,
    tokenizer: Tokenizer | None = None,
    *,
    model_type: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``params`` as a Hugging Face model folder: ``config.json``, ``model.safetensors``
    (and ``tokenizer.json`` when ``tokenizer`` has one). ``AutoModelForCausalLM`` loads it with
    the same logits.

    Args:
      params: the tree to write.
      path: the folder; it must not exist (or be empty) unless ``overwrite``.
      tokenizer: a gptfn tokenizer backed by a ``tokenizer.json`` (``bpe`` or ``hf`` kinds).
      model_type: the family to write (default: the first of ``gptfn.families.FAMILIES``
        that can express the config).
      overwrite: replace an existing folder.

    Returns:
      The folder's path. The folder appears whole or not at all (written beside, then renamed).
    """
    path = Path(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    tok_json = None if tokenizer is None else tokenizer_json(tokenizer)
    if tokenizer is not None and tok_json is None:
        raise ValueError(
            f"a {tokenizer.to_json().get('kind')!r} tokenizer has no tokenizer.json; save the "
            "model without it (tokenizer=None) or use a bpe / Hugging Face tokenizer"
        )
    config = hf_config(params, model_type) | {
        "torch_dtype": str(params["wte"].dtype).removeprefix("torch.")
    }
    tensors = _file_tensors(params, model_type)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tok_json is not None:
            (tmp / "tokenizer.json").write_text(tok_json, encoding="utf-8")
            special = {
                k: v
                for k, v in tokenizer.to_json().items()
                if k in ("bos_token", "eos_token") and v
            }  # type: ignore[union-attr]
            tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config), encoding="utf-8")
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
