"""gptfn.lm_eval against lm-eval's own HFLM on the same random tiny models, offline.

Each family's model gets a tiny BPE tokenizer trained here (61 tokens, the models' vocabulary):
GPT-2/NeoX style (BOS = EOS, nothing added), Llama style (BOS added by the post-processor) and
Qwen style (no BOS: EOS stands for an empty context). Tasks come from tests/data/lm_eval_tasks.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import optree
import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from hf_models import hf_model  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import gptfn  # noqa: E402
from gptfn.lm_eval import GPTFNLM, evaluate_tasks, format_table  # noqa: E402

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
TRAINING_TEXT = [
    "the cat sat on the mat.",
    "a dog ran to the red car!",
    "two plus two is four, one two three four five six.",
    "Question: what is it? Answer: yes. Q: A: is the sky red? no",
]
FAMILIES = {"gpt2": "gpt2", "llama": "llama_gqa", "qwen2": "qwen2", "gpt_neox": "neox_pythia"}
STYLE = {"gpt2": "gpt2", "llama": "llama", "qwen2": "qwen", "gpt_neox": "gpt2"}
LONG = "one two three four five six, then a dog ran to the red car and the cat sat on the mat"
GREEDY = {"until": ["."], "max_gen_toks": 6, "do_sample": False}


def tiny_tokenizer(style: str) -> transformers.PreTrainedTokenizerFast:
    """A 61-token BPE: ids 0 <s>, 1 </s>, 2 <unk>. "llama": BOS <s> added to every text;
    "gpt2": BOS = EOS = </s>, nothing added; "qwen": no BOS at all."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=61, special_tokens=["<s>", "</s>", "<unk>"], show_progress=False
    )
    tok.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    special = {"unk_token": "<unk>", "eos_token": "</s>", "pad_token": "<unk>"}
    if style == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
        )
        special["bos_token"] = "<s>"
    elif style == "gpt2":
        special["bos_token"] = "</s>"
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)


@pytest.fixture(scope="module")
def task_manager() -> TaskManager:
    return TaskManager(include_path=str(TASKS), include_defaults=False)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory) -> dict:
    """A random model of one family saved as a folder, loaded by transformers and by gptfn."""
    model = hf_model(FAMILIES[request.param], scale=4.0)  # peaky logits: no greedy near-ties
    tok = tiny_tokenizer(STYLE[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    params = gptfn.load_pretrained(folder)
    return {"name": request.param, "model": model, "tok": tok, "folder": folder, "params": params}


def hflm(family: dict, batch_size: int = 4) -> HFLM:
    return HFLM(pretrained=family["model"], tokenizer=family["tok"], batch_size=batch_size,
                device="cpu")  # fmt: skip


def ll_requests(bos: str) -> list[Instance]:
    pairs = [
        ("the cat sat on the", " mat"),
        ("the cat sat on the", " car"),  # one-token continuations sharing a context
        ("Question: two plus two is ", "four"),  # trailing space moves to the continuation
        ("", "the cat sat"),  # empty context: the prefix token
        ("a dog " * 5, " ran to the red car"),  # longer than max_length: left-truncated
        (LONG * 2, " four five"),
        (bos + "a dog", " ran"),  # already starts with the prefix token's text
    ]
    return [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]


def rolling_requests() -> list[Instance]:
    texts = ["the cat sat on the mat.", LONG * 3, "five", "Question: what is it? Answer: yes."]
    return [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]


def generation_requests() -> list[Instance]:
    args = [
        ("the cat sat on the", GREEDY),
        (LONG * 2, GREEDY),  # prompt cut to max_length - max_gen_toks
        ("Q: two plus two is", {"until": ["\n"], "max_gen_toks": 10}),
        ("a dog ran", {"until": ["is", "the"], "max_gen_toks": 12, "temperature": 0.0}),
    ]
    return [Instance("generate_until", {}, a, i) for i, a in enumerate(args)]


def bos_text(tok) -> str:
    return tok.decode([tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id])


def test_tokenization_matches_hflm(family):
    ours, theirs = GPTFNLM(family["params"], family["tok"]), hflm(family)
    assert ours.max_length == theirs.max_length == family["params"]["config"].block_size
    assert ours.prefix_token_id == theirs.prefix_token_id
    bos = bos_text(family["tok"])
    for text in ["the cat", "", bos + "the cat", "Question: yes "]:
        assert ours.tok_encode(text) == theirs.tok_encode(text), text
    for context, continuation in [("Q: two ", "four"), ("the cat", " sat  "), (bos + "a", " b")]:
        assert ours._encode_pair(context, continuation) == theirs._encode_pair(
            context, continuation
        )


def test_gptfn_tokenizer_reads_like_the_transformers_one(family):
    """gptfn's own reading of the folder's tokenizer.json gives the same ids and prefix."""
    own = gptfn.pretrained.load_pretrained_tokenizer(family["folder"])
    ours, theirs = GPTFNLM(family["params"], own), GPTFNLM(family["params"], family["tok"])
    assert ours.prefix_token_id == theirs.prefix_token_id
    assert ours.eot_token_id == theirs.eot_token_id
    for text in ["the cat", bos_text(family["tok"]) + "a dog ran", "Q: yes  "]:
        assert ours.tok_encode(text) == theirs.tok_encode(text), text
    requests = generation_requests()[:2]
    assert ours.generate_until(requests, True) == theirs.generate_until(requests, True)


def test_loglikelihood_matches_hflm(family):
    requests = ll_requests(bos_text(family["tok"]))
    ours = GPTFNLM(family["params"], family["tok"]).loglikelihood(requests, disable_tqdm=True)
    theirs = hflm(family).loglikelihood(requests, disable_tqdm=True)
    assert [g for _, g in ours] == [g for _, g in theirs]
    torch.testing.assert_close(
        torch.tensor([x for x, _ in ours]), torch.tensor([x for x, _ in theirs]),
        rtol=1e-4, atol=1e-4,
    )  # fmt: skip


def test_rolling_loglikelihood_matches_hflm(family):
    requests = rolling_requests()
    ours = GPTFNLM(family["params"], family["tok"]).loglikelihood_rolling(requests, True)
    theirs = hflm(family).loglikelihood_rolling(requests, True)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=1e-4)


def test_greedy_generation_matches_hflm(family):
    requests = generation_requests()
    ours = GPTFNLM(family["params"], family["tok"]).generate_until(requests, True)
    theirs = hflm(family).generate_until(requests, True)
    assert ours == theirs
    assert any(ours), "every generation is empty: the comparison would prove little"


def metrics(results: dict) -> dict[str, float]:
    """Every numeric metric of every task (standard errors left out)."""
    return {
        f"{task}/{name}": value
        for task, row in results["results"].items()
        for name, value in row.items()
        if isinstance(value, float) and "stderr" not in name
    }


def run_tasks(model, task_manager, **kwargs) -> dict:
    return simple_evaluate(
        model=model, tasks=["gptfn_tiny"], task_manager=task_manager, bootstrap_iters=0,
        log_samples=False, **kwargs,
    )  # fmt: skip


def test_task_metrics_match_hflm(family, task_manager):
    ours = metrics(run_tasks(GPTFNLM(family["params"], family["tok"]), task_manager))
    theirs = metrics(run_tasks(hflm(family), task_manager))
    assert ours.keys() == theirs.keys()
    expected = {"acc,none", "acc_norm,none", "word_perplexity,none", "exact_match,none"}
    assert expected <= {key.split("/")[1] for key in ours}
    for key in ours:
        assert math.isclose(ours[key], theirs[key], rel_tol=1e-4, abs_tol=1e-6), key


def test_requests_sharing_tokens_are_scored_at_their_own_split(family):
    """("", "the cat sat") and (BOS + "the cat", " sat") are the same ids split in two places:
    lm-eval's Collator groups them into one row. Each must still score its own continuation
    (HFLM 0.4.13 gathers the leading rows for the shorter one, so it is not the reference)."""
    bos = bos_text(family["tok"])
    pair = [("", "the cat sat"), (bos + "the cat", " sat")]
    requests = [Instance("loglikelihood", {}, args, i) for i, args in enumerate(pair)]
    lm = GPTFNLM(family["params"], family["tok"])
    together = lm.loglikelihood(requests, True)
    alone = [lm.loglikelihood([r], True)[0] for r in requests]
    assert together == alone
    whole = [lm.prefix_token_id, *lm.tok_encode(pair[0][1], add_special_tokens=False)]
    context, continuation = lm._encode_pair(*pair[1])
    assert context + continuation == whole  # the same ids indeed


def small_model() -> dict:
    config = gptfn.GPTConfig(vocab_size=61, block_size=32, n_layer=2, n_head=2, n_embd=16)
    return gptfn.init(config, seed=0)


def test_simple_evaluate_on_a_fresh_tree(task_manager):
    results = run_tasks(GPTFNLM(small_model(), tiny_tokenizer("gpt2")), task_manager)
    rows = results["results"]
    assert {"gptfn_tiny_mc", "gptfn_tiny_ppl", "gptfn_tiny_gen"} <= rows.keys()
    assert 0 <= rows["gptfn_tiny_mc"]["acc,none"] <= 1
    # a nearly uniform model over 61 tokens: a few tokens' perplexity per word, far from 1
    assert 1 < rows["gptfn_tiny_ppl"]["word_perplexity,none"] < math.inf
    table = format_table(results)
    assert "gptfn_tiny_ppl" in table and "word_perplexity" in table and "gptfn_tiny" in table


def test_registered_model_loads_a_saved_folder(tmp_path, task_manager):
    params, tok = small_model(), tiny_tokenizer("llama")
    folder = gptfn.save_pretrained(params, tmp_path / "model")
    tok.save_pretrained(folder)
    direct = metrics(run_tasks(GPTFNLM(params, tok), task_manager))
    by_name = run_tasks("gptfn", task_manager, model_args={"pretrained": str(folder)})
    assert metrics(by_name) == pytest.approx(direct, rel=1e-5)
    bf16 = run_tasks(
        "gptfn", task_manager, model_args={"pretrained": str(folder), "dtype": "bfloat16"},
        batch_size="4",
    )  # fmt: skip
    assert bf16["config"]["model_dtype"] == "torch.bfloat16"
    assert metrics(bf16) == pytest.approx(direct, rel=0.05)


def test_registered_model_loads_a_run_directory(data_dir, tmp_path):
    """``pretrained=`` a gptfn run directory (two training steps through the command line)."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "gptfn", "train", "--data", str(data_dir), "--out", str(run),
               "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
               "--batch-size", "4", "--eval-steps", "1", "--max-steps", "2", "--no-progress",
               "--sample-tokens", "0"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, capture_output=True, timeout=300, env=env)
    params, tok, _ = gptfn.load_run(run)
    newline = tok.encode("\n")[0]
    text = "the cat sat on the mat, and on it" * 2
    requests = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    direct = GPTFNLM(params, tok, prefix_token_id=newline).loglikelihood_rolling(requests, True)
    lm = GPTFNLM(pretrained=run, dtype="bfloat16", prefix_token_id=newline)
    assert lm.params["wte"].dtype == torch.bfloat16 and lm.max_length == 16
    loaded = GPTFNLM(pretrained=run, prefix_token_id=newline).loglikelihood_rolling(requests, True)
    assert loaded == direct and direct[0] < 0


def test_batching_changes_nothing(family):
    one = GPTFNLM(family["params"], family["tok"], batch_size=1)
    many = GPTFNLM(family["params"], family["tok"], batch_size=16)
    requests = ll_requests(bos_text(family["tok"]))
    a, b = one.loglikelihood(requests, True), many.loglikelihood(requests, True)
    assert [g for _, g in a] == [g for _, g in b]
    torch.testing.assert_close(torch.tensor([x for x, _ in a]), torch.tensor([x for x, _ in b]))
    rolling = rolling_requests()
    torch.testing.assert_close(
        torch.tensor(one.loglikelihood_rolling(rolling, True)),
        torch.tensor(many.loglikelihood_rolling(rolling, True)),
    )
    generation = generation_requests()
    assert one.generate_until(generation, True) == many.generate_until(generation, True)


def test_sampled_generation_follows_the_seed():
    lm = GPTFNLM(small_model(), tiny_tokenizer("gpt2"))
    sampled = {"until": ["\n"], "max_gen_toks": 10, "do_sample": True, "temperature": 1.0}
    requests = [Instance("generate_until", {}, (text, sampled), i) for i, text in
                enumerate(["the cat", "a dog ran to the"])]  # fmt: skip
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(lm.generate_until(requests, True))
    assert runs[0] == runs[1] != runs[2]


def test_bad_task_name_is_named_with_where_it_looked(task_manager):
    with pytest.raises(ValueError, match=r"'gptfn_tiny_mcq'.*lm_eval_tasks.*gptfn_tiny_mc"):
        evaluate_tasks(small_model(), tiny_tokenizer("gpt2"), ["gptfn_tiny_mcq"],
                       include_path=TASKS, task_manager=task_manager)  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no_such_tasks"):
        evaluate_tasks(small_model(), tiny_tokenizer("gpt2"), "gptfn_tiny",
                       include_path=TASKS / "no_such_tasks")  # fmt: skip


def test_bad_model_path_is_named(tmp_path, task_manager):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        GPTFNLM(pretrained=missing)
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        run_tasks("gptfn", task_manager, model_args={"pretrained": str(missing)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*neither a gptfn run directory"):
        evaluate_tasks(tmp_path / "empty", None, "gptfn_tiny", task_manager=task_manager)


def test_char_tokenizer_needs_a_prefix_token():
    text = "".join(sorted(set("".join(TRAINING_TEXT))))
    tok = gptfn.data.CharTokenizer.train(text)
    config = gptfn.GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2,
                             n_embd=8)  # fmt: skip
    params = gptfn.init(config)
    requests = [Instance("loglikelihood_rolling", {}, ("the cat sat on the mat.",), 0)]
    with pytest.raises(ValueError, match="prefix_token_id"):
        GPTFNLM(params, tok).loglikelihood_rolling(requests, True)
    space = tok.encode(" ")[0]
    score = GPTFNLM(params, tok, prefix_token_id=space).loglikelihood_rolling(requests, True)
    assert score[0] < 0


def test_doc_example_runs(monkeypatch):
    """docs/lm_eval.md's python blocks run as written (from the repository root)."""
    root = Path(__file__).parents[1]
    page = (root / "docs" / "lm_eval.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert blocks
    monkeypatch.chdir(root)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"lm_eval.md[python block {i}]", "exec"), namespace)
    assert "gptfn_tiny_ppl" in namespace["format_table"](namespace["results"])


def test_import_gptfn_does_not_import_lm_eval():
    code = "import sys, gptfn; assert 'lm_eval' not in sys.modules, 'lm_eval imported'"
    root = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_a_lora_merge_and_compiled_generation_evaluate_like_any_tree(task_manager):
    from gptfn import lora

    params, tok = small_model(), tiny_tokenizer("gpt2")
    adapters = lora.init(params, rank=2, targets=("w_q", "w_v"), seed=1)
    adapters = optree.tree_map(lambda t: t + 0.5, adapters)  # B non-zero: the merge moves
    merged = lora.merge(params, adapters)
    results = metrics(run_tasks(GPTFNLM(merged, tok), task_manager))
    assert results != metrics(run_tasks(GPTFNLM(params, tok), task_manager))
    generation = generation_requests()
    eager = GPTFNLM(merged, tok).generate_until(generation, True)
    assert GPTFNLM(merged, tok, compile="true").generate_until(generation, True) == eager
