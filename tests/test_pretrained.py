"""Pretrained models from local files: HF folders (single and sharded safetensors), the local HF
cache offline, clear refusals (pickles, unknown families, overwrites), ``save_pretrained``
folders that transformers loads, and ``tokenizer.json`` behind gptfn's tokenizer interface."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_tokens
from hf_models import FAMILY_CONFIGS, hf_model, transformers
from safetensors.torch import load_file, save_file

import gptfn
from gptfn.data.tokenizers import HFTokenizer, tokenizer_from_json
from gptfn.pretrained import load_pretrained_tokenizer

TOKENS = random_tokens(61, 2, 11, 3)


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_load_pretrained_from_a_folder(tmp_path, shard):
    model = hf_model("llama_gqa")
    kwargs = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(tmp_path / "m", **kwargs)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert ("model.safetensors.index.json" in files) == (shard is not None), files
    params = gptfn.load_pretrained(tmp_path / "m")
    torch.testing.assert_close(gptfn.forward(params, TOKENS), logits_of(model))
    half = gptfn.load_pretrained(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert half["wte"].dtype == torch.bfloat16 and half["config"] == params["config"]


def _make_cache(cache: Path, repo: str, folder: Path) -> None:
    """The layout huggingface_hub writes: blobs, a snapshot of links to them, refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(folder.iterdir())):
        blob = root / "blobs" / f"{i:040d}"
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


def test_load_pretrained_resolves_an_id_in_the_local_cache_offline(tmp_path):
    model = hf_model("neox_pythia")
    model.save_pretrained(tmp_path / "folder")
    _make_cache(tmp_path / "hub", "tiny-org/tiny-pythia", tmp_path / "folder")
    save_file({"tokens": TOKENS}, str(tmp_path / "tokens.safetensors"))
    code = (
        "import sys, gptfn; from safetensors.torch import load_file, save_file; "
        "p = gptfn.load_pretrained('tiny-org/tiny-pythia'); "
        "t = load_file(sys.argv[1])['tokens']; "
        "save_file({'logits': gptfn.forward(p, t)}, sys.argv[2])"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = tmp_path / "logits.safetensors"
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "tokens.safetensors"), str(out)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    torch.testing.assert_close(load_file(str(out))["logits"], logits_of(model))
    missing = subprocess.run(
        [sys.executable, "-c", "import gptfn; gptfn.load_pretrained('tiny-org/absent')"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0
    assert "neither a local folder nor a model in the Hugging Face cache" in missing.stderr


def test_pickled_weights_are_refused_with_how_to_convert(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(FAMILY_CONFIGS["gpt2"]().to_dict()))
    (folder / "pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(FileNotFoundError) as err:
        gptfn.load_pretrained(folder)
    message = str(err.value)
    assert "pytorch_model.bin" in message and "gptfn never unpickles" in message
    assert "save_pretrained" in message


def test_unknown_model_type_is_refused_before_reading_weights(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match=r"'mamba' is not supported; gptfn converts: gpt2 .*llama"):
        gptfn.load_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        gptfn.load_pretrained(tmp_path / "nothing-here")


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_save_pretrained_loads_in_transformers_with_the_same_logits(tmp_path, name):
    model = hf_model(name)
    params = gptfn.from_hf(model.state_dict(), model.config)
    gptfn.save_pretrained(params, tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(loaded) is type(model)
    torch.testing.assert_close(logits_of(loaded), gptfn.forward(params, TOKENS))
    again = gptfn.load_pretrained(tmp_path / "out")
    assert again["config"] == params["config"]


def test_save_pretrained_never_overwrites_unasked(tmp_path):
    params = gptfn.init(gptfn.GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    gptfn.save_pretrained(params, tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    other = gptfn.init(params["config"], seed=9)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        gptfn.save_pretrained(other, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    gptfn.save_pretrained(other, tmp_path / "out", overwrite=True)
    assert torch.equal(gptfn.load_pretrained(tmp_path / "out")["wte"], other["wte"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left


def _bpe_tokenizer_json(folder: Path, bos: bool) -> None:
    """A byte-level BPE tokenizer.json trained offline (optionally Llama-style: a leading <s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["the cat sat on the mat", "a dog; ünïcödé too"] * 20, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def test_tokenizer_json_behind_gptfns_interface(tmp_path):
    _bpe_tokenizer_json(tmp_path / "tok", bos=True)
    tok = load_pretrained_tokenizer(tmp_path / "tok")
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tok/tokenizer.json")
    )
    text = "the dog sat on ünïcödé"
    assert tok.encode(text) == reference.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=True) == [tok.bos_token_id, *tok.encode(text)]
    assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.vocab_size == reference.vocab_size
    back = tokenizer_from_json(json.loads(json.dumps(tok.to_json())))  # as a checkpoint holds it
    assert isinstance(back, HFTokenizer) and back.encode(text) == tok.encode(text)
    assert back.bos_token_id == 0
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        HFTokenizer.from_file(tmp_path)


def test_save_pretrained_with_a_tokenizer(tmp_path):
    _bpe_tokenizer_json(tmp_path / "tok", bos=False)
    tok = HFTokenizer.from_file(tmp_path / "tok")
    cfg = gptfn.GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=8)
    gptfn.save_pretrained(gptfn.init(cfg), tmp_path / "out", tok)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "the cat sat"
    assert theirs.encode(text, add_special_tokens=False) == tok.encode(text)
    assert load_pretrained_tokenizer(tmp_path / "out").encode(text) == tok.encode(text)
    char = gptfn.data.tokenizers.CharTokenizer("abc")
    with pytest.raises(ValueError, match=r"'char' tokenizer has no tokenizer\.json"):
        gptfn.save_pretrained(gptfn.init(cfg), tmp_path / "other", char)


def test_dtype_and_device_on_load_convert_tensor_by_tensor(tmp_path):
    """A float32 folder loaded as bfloat16 never holds the float32 model (peak memory of a
    fresh process, Linux's ru_maxrss); ``device="meta"`` reads shapes and dtypes only."""
    import subprocess
    import sys
    import textwrap

    cfg = gptfn.GPTConfig(vocab_size=8192, block_size=64, n_layer=4, n_head=8, n_embd=512,
                          position="rotary", norm="rmsnorm", mlp="swiglu", bias=False,
                          tie_embeddings=False)  # fmt: skip
    params = gptfn.init(cfg)
    folder = gptfn.save_pretrained(params, tmp_path / "fp32")
    fp32_bytes = sum(x.numel() * 4 for x in gptfn.tree.leaves(params))
    meta = gptfn.load_pretrained(folder, device="meta", dtype=torch.bfloat16)
    assert meta["config"] == cfg and meta["wte"].device.type == "meta"
    assert meta["wte"].dtype == torch.bfloat16 and meta["wte"].shape == params["wte"].shape
    code = textwrap.dedent(f"""
        import pathlib, torch, gptfn
        def status(field):
            lines = pathlib.Path("/proc/self/status").read_text().splitlines()
            return next(int(l.split()[1]) * 1024 for l in lines if l.startswith(field + ":"))
        pathlib.Path("/proc/self/clear_refs").write_text("5")  # a new peak from here
        before = status("VmRSS")
        params = gptfn.load_pretrained({str(folder)!r}, dtype=torch.bfloat16)
        assert all(x.dtype == torch.bfloat16 for x in gptfn.tree.leaves(params))
        print(status("VmHWM") - before)
    """)
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak memory is read from Linux's /proc")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak = int(out.stdout.split()[-1])
    # the bfloat16 model is half the float32 bytes (+ a 64 MiB chunk); a float32 copy would
    # add all of them
    assert peak < 0.5 * fp32_bytes + 80 * 2**20, (peak, fp32_bytes)
    loaded = gptfn.load_pretrained(folder, dtype=torch.bfloat16)
    torch.testing.assert_close(loaded["wte"], params["wte"].to(torch.bfloat16), rtol=0, atol=0)
