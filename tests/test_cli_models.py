"""The command line with pretrained models: ``sample``/``eval --model``, ``prepare --tokenizer``
with a model's tokenizer, ``train --init-from``, ``export --hf``, and architecture flags.

A tiny random Llama folder with a byte-level BPE ``tokenizer.json`` (Llama-style leading
``<s>``) is made offline. Each behaviour is seen once through the real command (a subprocess);
the follow-up checks call ``gptfn.cli.main`` in-process (quicker), as in test_cli.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_models import transformers
from safetensors.torch import load_file
from test_cli import TINY, run_all
from test_cli import gptfn as command

import gptfn as gf
from gptfn.checkpoint import load_run, load_run_parts, save_checkpoint
from gptfn.cli import main
from gptfn.data import prepare, shakespeare
from gptfn.evaluate import windows
from gptfn.pretrained import load_pretrained_tokenizer

FINE_TUNE = [
    "--batch-size", "2", "--block-size", "24", "--eval-steps", "1", "--eval-interval", "2",
    "--warmup-steps", "1", "--no-progress", "--sample-tokens", "0", "--lr", "1e-3",
]  # fmt: skip


def _tokenizer(folder, text: str) -> None:
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
    tok.train_from_iterator(text.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A folder as Hugging Face writes one: a tiny random Llama (grouped-query, untied), its
    tokenizer.json, and some text."""
    root = tmp_path_factory.mktemp("pretrained")
    folder = root / "tiny-llama"
    folder.mkdir()
    _tokenizer(folder, shakespeare()[:20_000])
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # peaky logits: greedy decoding without near-ties
        for p in model.parameters():
            p.mul_(4.0 if p.ndim > 1 else 1.0).add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(folder)
    (root / "plays.txt").write_text(shakespeare()[20_000:30_000])
    (root / "short.txt").write_text("ROMEO: what light through yonder window")
    (root / "long.txt").write_text(shakespeare()[30_000:31_000])  # > 48 tokens
    return folder


def test_sample_and_eval_a_pretrained_folder(llama, capsys):
    sample, scores = run_all(  # the two commands at once (2 cores)
        ["sample", "--model", str(llama), "--prompt", "ROMEO:", "--temperature", "0",
         "--max-new-tokens", "6"],
        ["eval", "--model", str(llama), "--text", str(llama.parent / "short.txt"), "--json"],
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    tok = load_pretrained_tokenizer(llama)
    ids = torch.tensor([[tok.bos_token_id, *tok.encode("ROMEO:")]])  # Llama: after <s>
    theirs = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert sample.split("\n" + "-" * 40)[0] == "ROMEO:" + tok.decode(theirs[0, ids.shape[1] :])

    text = (llama.parent / "short.txt").read_text()
    report = json.loads(scores)
    ids = torch.tensor([[tok.bos_token_id, *tok.encode(text)]])
    with torch.no_grad():
        nll = float(model(ids, labels=ids).loss)  # every token after <s> scored
    assert report["tokens"] == ids.shape[1] - 1 and report["model"] == str(llama)
    assert report["mean_nll"] == pytest.approx(nll, rel=1e-5)
    long = llama.parent / "long.txt"  # longer than the context: sliding windows
    assert (
        main(["eval", "--model", str(llama), "--text", str(long), "--stride", "16", "--json"]) == 0
    )
    longer = json.loads(capsys.readouterr().out)
    ids = [tok.bos_token_id, *tok.encode(long.read_text())]
    total = 0.0  # Hugging Face's model on the same windows: 48 tokens, 16 apart
    for start, end, first in windows(len(ids), 48, 16):
        x = torch.tensor(ids[start:end])
        with torch.no_grad():
            nll = torch.nn.functional.cross_entropy(
                model(x[None, :-1]).logits[0], x[1:], reduction="none"
            )
        total += float(nll[first - start - 1 :].sum())
    assert longer["tokens"] == len(ids) - 1 and longer["stride"] == 16
    assert longer["mean_nll"] == pytest.approx(total / (len(ids) - 1), rel=1e-5)


def test_sample_and_eval_say_what_is_missing(llama, capsys):
    for argv, message in [
        (["sample", "--prompt", "x"], "one of the arguments --run --model is required"),
        (["sample", "--run", "r", "--model", str(llama)], "--model: not allowed with argument"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err
    assert main(["eval", "--model", str(llama)]) == 1
    assert "--model needs --text FILE" in capsys.readouterr().err
    assert main(["sample", "--model", str(llama), "--checkpoint", "best"]) == 1
    assert "--model has none" in capsys.readouterr().err
    assert main(["prepare", "--out", "x", "--tokenizer", "bep"]) == 1
    assert "--tokenizer 'bep': not one of char, bpe, gpt2" in capsys.readouterr().err


def test_fine_tune_a_pretrained_model_then_sample_eval_resume_export(llama, tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    out = command("prepare", "--input", str(llama.parent / "plays.txt"), "--tokenizer", str(llama),
                "--out", str(data))  # fmt: skip
    assert out.returncode == 0 and json.loads(out.stdout)["tokenizer"] == "hf", out.stderr
    out = command("train", "--init-from", str(llama), "--data", str(data), "--out", str(run),
                *FINE_TUNE, "--max-steps", "2")  # fmt: skip
    assert out.returncode == 0, out.stderr
    params, tok, meta = load_run(run)
    before = gf.load_pretrained(llama)
    assert params["config"] == before["config"] and meta["train"]["n_layer"] == 2
    assert meta["train"]["block_size"] == 24 and meta["train"]["init_from"] == str(llama)
    moved = max(float((params[k] - before[k]).abs().max()) for k in ("wte", "unembed"))
    assert 0 < moved < 0.01  # two small steps from the pretrained weights, not from scratch
    assert tok.encode("ROMEO") == load_pretrained_tokenizer(llama).encode("ROMEO")

    sample = ["sample", "--run", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "4"]
    assert main(sample) == 0 and capsys.readouterr().out.startswith("ROMEO:")
    assert main(["eval", "--run", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    resume = ["train", "--init-from", str(llama), "--data", str(data), "--out", str(run),
              *FINE_TUNE, "--max-steps", "3", "--resume"]  # fmt: skip
    assert main(resume) == 0 and "resuming from" in capsys.readouterr().out
    assert main(["export", "--run", str(run), "--hf", str(tmp_path / "hf")]) == 0
    assert "model_type llama" in capsys.readouterr().out
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")("ROMEO")[
        "input_ids"]])  # fmt: skip
    assert ids[0, 0] == tok.bos_token_id and ids[0, 1:].tolist() == tok.encode("ROMEO")
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, gf.forward(load_run(run)[0], ids))


def test_fine_tuning_refuses_other_tokenizers_and_contradicting_flags(llama, tmp_path, capsys):
    chars = tmp_path / "chars"
    prepare(llama.parent / "plays.txt", chars, "char")
    out = command("train", "--init-from", str(llama), "--data", str(chars), "--out",
                str(tmp_path / "r"), *FINE_TUNE)  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"the data in {chars} was tokenized with another tokenizer (char)" in out.stderr
    assert f"than the model {llama}'s tokenizer.json" in out.stderr
    assert f"--tokenizer {llama}" in out.stderr  # how to prepare it instead
    assert not (tmp_path / "r").exists()  # refused before anything was written
    assert main(["train", "--init-from", str(llama), "--out", str(tmp_path / "r")]) == 1
    assert "--init-from: invalid value" in capsys.readouterr().err  # "needs --data: ..."
    bpe = tmp_path / "bpe"  # a byte-level BPE of the same size, trained on the same text
    prepare(llama.parent / "plays.txt", bpe, "bpe", vocab_size=300)
    assert main(["train", "--init-from", str(llama), "--data", str(bpe), "--out",
                 str(tmp_path / "r"), *FINE_TUNE]) == 1  # fmt: skip
    assert "is ids [" in capsys.readouterr().err  # same vocabulary size, other ids

    data = tmp_path / "data"
    tokenizer_file = str(llama / "tokenizer.json")  # the file itself will do, too
    assert main(["prepare", "--input", str(llama.parent / "plays.txt"), "--tokenizer",
                 tokenizer_file, "--out", str(data)]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 300
    argv = ["train", "--init-from", str(llama), "--data", str(data), "--out", str(tmp_path / "r")]
    assert main([*argv, *FINE_TUNE, "--n-layer", "4", "--norm", "layernorm", "--block-size",
                 "64"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "--n-layer 4 (the model: 2)" in err and "--norm layernorm (the model: rmsnorm)" in err
    assert "--block-size 64 (the model's context is 48" in err


def test_architecture_flags_train_a_variant_that_exports(tmp_path, capsys):
    text = tmp_path / "plays.txt"
    text.write_text(shakespeare()[:5_000])
    prepare(text, tmp_path / "data", "char")
    run = tmp_path / "run"
    variant = ["--position", "rotary", "--norm", "rmsnorm", "--mlp", "swiglu", "--n-kv-head", "1",
               "--no-tie-embeddings", "--no-bias", "--rope-theta", "500", "--norm-eps", "1e-6",
               "--no-qk-norm"]  # Llama has none; the speedrun recipe turns it on  # fmt: skip
    args = ["train", "--data", str(tmp_path / "data"), *TINY, "--max-steps", "2"]
    out = command(*args, "--out", str(run), *variant)
    assert out.returncode == 0, out.stderr
    params, _, meta = load_run(run)
    cfg = params["config"]
    assert (cfg.position, cfg.norm, cfg.mlp, cfg.n_head, cfg.n_kv_head) == (
        "rotary", "rmsnorm", "swiglu", 2, 1,
    )  # fmt: skip
    assert (cfg.tie_embeddings, cfg.bias, cfg.rope_theta, cfg.norm_eps) == (False, False, 500, 1e-6)
    assert meta["model"] == cfg.to_dict() and "wpe" not in params and "w_gate" in str(params)

    assert main([*args, "--out", str(run), "--resume", "--max-steps", "3"]) == 1
    err = capsys.readouterr().err
    assert "cannot resume" in err and "norm rmsnorm there, layernorm here" in err

    assert main(["export", "--run", str(run), "--hf", str(tmp_path / "hf")]) == 0
    assert "a char tokenizer has no tokenizer.json" in capsys.readouterr().out
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, gf.forward(params, ids))
    assert main(["export", "--run", str(run), "--hf", str(tmp_path / "hf")]) == 1
    assert "is not empty; pass --overwrite" in capsys.readouterr().err


def test_export_of_an_architecture_no_family_holds_says_why(tmp_path, capsys):
    cfg = gf.GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=8, qk_norm=True)
    (tmp_path / "run").mkdir()
    meta = {"step": 1, "tokenizer": {"kind": "char", "chars": "abcde"}, "model": cfg.to_dict()}
    save_checkpoint(tmp_path / "run" / "last.safetensors", gf.init(cfg), None, meta)
    assert main(["export", "--run", str(tmp_path / "run"), "--hf", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "no Hugging Face family fits this model" in err and "qk_norm=True" in err
    assert not (tmp_path / "hf").exists()


def test_lora_fine_tune_trains_adapters_only_resumes_exactly_and_exports(llama, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    data, run, cut = tmp_path / "data", tmp_path / "run", tmp_path / "cut"
    assert main(["prepare", "--input", str(llama.parent / "plays.txt"), "--tokenizer",
                 str(llama), "--out", str(data)]) == 0  # fmt: skip
    lora = ["train", "--init-from", str(llama), "--data", str(data), *FINE_TUNE, "--lora-rank",
            "4", "--lora-alpha", "8", "--lora-targets", "q,v,gate", "--optimizer", "adamw",
            "--lr", "3e-2"]  # fmt: skip
    assert main([*lora, "--out", str(run), "--max-steps", "4"]) == 0
    assert "LoRA: training " in capsys.readouterr().out
    # the checkpoint holds the adapters only (small), the optimizer state adapters only
    tensors = load_file(run / "last.safetensors")
    assert tensors and all(".a" in k or ".b" in k for k in tensors if k.startswith("params."))
    moments = [k for k in tensors if k.startswith("opt.") and (".mu." in k or ".nu." in k)]
    assert moments and all(k.split(".")[-1] in ("a", "b") for k in moments), moments[:3]
    base, adapters, _, meta = load_run_parts(run)
    assert meta["lora"] == {"base": str(llama), "rank": 4, "alpha": 8.0,
                            "targets": ["w_q", "w_v", "w_gate"]}  # fmt: skip
    before = gf.load_pretrained(llama, dtype=torch.float32)
    for k, v in gf.tree.flatten(base).items():
        assert torch.equal(v, gf.tree.flatten(before)[k]), k  # the base is untouched
    b = adapters["blocks"][0]["attn"]["w_q"]["b"]
    assert float(b.abs().max()) > 0  # B moved from zero: the adapters trained
    merged = load_run(run)[0]  # sample / eval read base + adapters
    torch.testing.assert_close(merged["wte"], before["wte"])
    assert not torch.equal(merged["blocks"][0]["attn"]["w_q"], before["blocks"][0]["attn"]["w_q"])
    assert main(["sample", "--run", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "3"]) == 0
    # resume is exact: 2 steps, stop, 2 more == 4 straight
    assert main([*lora, "--out", str(cut), "--max-steps", "2"]) == 0
    assert main([*lora, "--out", str(cut), "--max-steps", "4", "--resume"]) == 0
    for k, v in load_file(run / "last.safetensors").items():
        assert torch.equal(v, load_file(cut / "last.safetensors")[k]), k
    capsys.readouterr()
    # exports: PEFT adapter (same logits in peft), merged HF model, and the refusals
    assert main(["export", "--run", str(run), "--hf", str(tmp_path / "no")]) == 1
    assert "--peft DIR, or base + adapters as one model with --hf DIR --merge" in (
        capsys.readouterr().err
    )
    assert main(["export", "--run", str(run), "--peft", str(tmp_path / "peft")]) == 0
    assert main(["export", "--run", str(run), "--hf", str(tmp_path / "hf"), "--merge"]) == 0
    ids = torch.tensor([[0, 5, 9, 17, 33]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()(ids).logits
        merged_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(ids).logits
    ours = gf.forward(merged, ids)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_hf, ours, atol=1e-5, rtol=1e-5)
    bad = ["train", "--data", str(data), "--out", str(tmp_path / "x"), "--lora-rank", "4"]
    assert main(bad) == 1
    assert "--lora-rank: invalid value 4: LoRA adapts a pretrained model" in capsys.readouterr().err


TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"


def test_eval_tasks_runs_the_harness_on_a_folder_and_a_run(llama, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    out = tmp_path / "results.json"
    args = ["--tasks", "gptfn_tiny", "--include-path", str(TASKS), "--limit", "3"]
    assert main(["eval", "--model", str(llama), *args, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    for task in ("gptfn_tiny_mc", "gptfn_tiny_ppl", "gptfn_tiny_gen"):
        assert task in printed
    results = json.loads(out.read_text())["results"]
    assert (
        results["gptfn_tiny_mc"]["acc,none"] >= 0
        and "word_perplexity,none" in (results["gptfn_tiny_ppl"])
    )
    assert main(["eval", "--model", str(llama), "--tasks", "no_such_task"]) == 1
    assert "no_such_task" in capsys.readouterr().err
    # a run: the JSON lands beside it, a new file each time
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare", "--input", str(llama.parent / "plays.txt"), "--tokenizer",
                 str(llama), "--out", str(data)]) == 0  # fmt: skip
    assert main(["train", "--init-from", str(llama), "--data", str(data), "--out", str(run),
                 *FINE_TUNE, "--max-steps", "1"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["eval", "--run", str(run), *args]) == 0
    written = list((run / "lm_eval").glob("gptfn_tiny-*.json"))
    assert len(written) == 1 and "gptfn_tiny_gen" in json.loads(written[0].read_text())["results"]


def _char_tokenizer(folder: Path, text: str) -> None:
    """A character-level ``tokenizer.json`` with a Llama-style leading ``<s>`` (fits vocab 61)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<s>": 0, "</s>": 1} | {c: i + 2 for i, c in enumerate(sorted(set(text)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


NEW_FAMILIES = ["mistral", "qwen3", "olmo2", "smollm3", "gemma2", "gemma3", "phi3_longrope"]


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_each_new_family_samples_evaluates_and_fine_tunes_from_a_folder(name, tmp_path, capsys):
    from hf_models import hf_model

    text = "the quick brown fox jumps over the lazy dog.\n" * 60
    folder = tmp_path / name
    model = hf_model(name, scale=3.0)
    model.save_pretrained(folder)
    _char_tokenizer(folder, text)
    (tmp_path / "text.txt").write_text(text)
    (tmp_path / "short.txt").write_text("the lazy dog jumps over the fox.")
    sample = ["sample", "--model", str(folder), "--prompt", "the", "--temperature", "0",
              "--max-new-tokens", "6"]  # fmt: skip
    assert main(sample) == 0  # (greedy tokens equal HF's: tests/test_families_modern.py)
    assert capsys.readouterr().out.startswith("the")
    tok = load_pretrained_tokenizer(folder)
    score = ["eval", "--model", str(folder), "--text", str(tmp_path / "short.txt"), "--json"]
    assert main(score) == 0
    ids = torch.tensor([[0, *tok.encode((tmp_path / "short.txt").read_text())]])
    with torch.no_grad():
        nll = float(model(ids, labels=ids).loss)
    assert json.loads(capsys.readouterr().out)["mean_nll"] == pytest.approx(nll, rel=1e-4)
    data = tmp_path / "data"
    assert main(["prepare", "--input", str(tmp_path / "text.txt"), "--tokenizer", str(folder),
                 "--out", str(data)]) == 0  # fmt: skip
    tune = ["train", "--init-from", str(folder), "--data", str(data), "--out",
            str(tmp_path / "r"), "--batch-size", "2", "--block-size", "16", "--eval-steps", "1",
            "--max-steps", "2", "--warmup-steps", "1", "--no-progress", "--sample-tokens", "0",
            "--lr", "1e-3"]  # fmt: skip
    assert main(tune) == 0
    assert load_run(tmp_path / "r")[0]["config"] == gf.load_pretrained(folder)["config"]
