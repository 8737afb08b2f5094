import json
from pathlib import Path
import random

import pytest
import torch
from conftest import lm_eval_mc_task, tiny_gpt
import torch.nn.functional as F

from gptn.checkpoint import save_checkpoint
from gptn.cli import main
from gptn.config import GptnError
from gptn.fewshot import (Doc, Task, build_prompt, choose, encode_pair, evaluate_fewshot, fit_prompt, load_task,
                          load_task_file, loglikelihood_tokens, sample_demos, token_f1)
from gptn.tokenizer import CharTokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyzTEF ?:=>\n"


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.from_text(ALPHABET)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_gpt(tok.vocab_size, n_ctx=64)


def translation_task():
    docs = [Doc("sea otter =>", answers=["loutre de mer"]), Doc("peppermint =>", answers=["menthe poivree"]),
            Doc("cheese =>", answers=["fromage"])]
    return Task("en-fr", "generate", docs, description="Translate English to French:", max_gen_tokens=4)


def test_zero_one_and_few_shot_prompts_are_gpt3s():
    task = translation_task()
    query, demo1, demo2 = task.docs[2], task.docs[0], task.docs[1]
    assert build_prompt(task, query, []) == "Translate English to French:\n\ncheese =>"
    assert build_prompt(task, query, [demo1]) == "Translate English to French:\n\nsea otter => loutre de mer\n\ncheese =>"
    assert build_prompt(task, query, [demo1, demo2]) == (
        "Translate English to French:\n\nsea otter => loutre de mer\n\npeppermint => menthe poivree\n\ncheese =>")
    mc = Task("mc", "multiple_choice", [Doc("q:", ["a", "b"], 1)], target_delimiter=" ", separator="\n")
    assert build_prompt(mc, Doc("r:", ["c", "d"], 0), [mc.docs[0]]) == "q: b\nr:"


def test_demonstrations_never_include_the_query():
    docs = [Doc(f"q{i} =>", answers=[f"a{i}"]) for i in range(12)]
    task = Task("t", "generate", docs)
    for i in range(len(docs)):
        for seed in range(3):
            demos = sample_demos(task, i, 11, seed)
            assert docs[i] not in demos and len(demos) == 11 and len(set(map(id, demos))) == 11
    assert sample_demos(task, 3, 4, seed=7) == sample_demos(task, 3, 4, seed=7)  # seeded
    with pytest.raises(GptnError, match="pool has only 11"):
        sample_demos(task, 0, 12, 0)


def test_demonstrations_that_do_not_fit_are_dropped_and_counted(tok):
    docs = [Doc("a" * 20 + " =>", answers=["b" * 5]) for _ in range(6)] + [Doc("q =>", answers=["x"])]
    task = Task("t", "generate", docs, max_gen_tokens=4)
    prompt, used = fit_prompt(task, docs[-1], docs[:5], tok, n_ctx=100)  # a demonstration is 29+2 tokens
    assert used == 2 and len(tok.encode(prompt)) + len(tok.encode(" x")) + 4 <= 100
    assert prompt.endswith("q =>") and prompt.count("=>") == 3


def test_each_normalisation_on_a_hand_computed_case():
    loglik, n_tokens, choices = [-6.0, -4.0, -9.0], [3, 1, 9], ["abc", "d", "efghijklm"]
    assert choose(loglik, n_tokens, choices, "sum") == 1  # -4 is the largest
    assert choose([-6.0, -5.0, -9.0], [3, 1, 9], choices, "per_token") == 2  # -2, -5, -1
    assert choose([-6.0, -5.0, -9.0], [3, 1, 9], ["abcdef", "d", "efghijklmnopqrs"], "per_char") == 2  # -1, -5, -0.6
    # GPT-3: log P(answer | context) - log P(answer | "Answer:")
    assert choose([-6.0, -4.0, -9.0], [1, 1, 1], choices, "unconditional", [-10.0, -4.5, -9.2]) == 0  # 4, .5, .2


def test_shared_context_scoring_equals_one_sequence_at_a_time(model):
    rng = random.Random(0)
    reqs = []
    for _ in range(15):
        ctx = [rng.randrange(model.config.vocab_size) for _ in range(rng.randint(1, 80))]  # some exceed n_ctx
        for _ in range(rng.randint(1, 4)):
            reqs.append((ctx, [rng.randrange(model.config.vocab_size) for _ in range(rng.randint(1, 6))]))
    got = loglikelihood_tokens(model, reqs, batch_size=5)
    for (ctx, cont), (ll, greedy, n) in zip(reqs, got):
        whole = (ctx + cont)[-(model.config.n_ctx + 1):]
        with torch.no_grad():
            lp = F.log_softmax(model(torch.tensor(whole[:-1])[None])[0], -1)[-len(cont):]
        target = torch.tensor(cont)
        assert ll == pytest.approx(lp.gather(1, target[:, None]).sum().item(), abs=1e-4)
        assert greedy == bool((lp.argmax(-1) == target).all()) and n == len(cont)


def test_an_over_long_item_is_cut_like_lm_eval_and_counted_not_fatal(tmp_path, run, model, capsys):
    # A continuation longer than the window keeps its last n_ctx tokens, scored after the one before them.
    n = model.config.n_ctx
    cont = [(7 * i) % model.config.vocab_size for i in range(n + 20)]
    (ll, _, scored), = loglikelihood_tokens(model, [([1, 2, 3], cont)])
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor(cont[-(n + 1):-1])[None])[0], -1)
    assert scored == n and ll == pytest.approx(lp.gather(1, torch.tensor(cont[-n:])[:, None]).sum().item(), abs=1e-4)
    # In a task: one item whose answer alone overflows the window; the run goes on and says so.
    docs = [{"q": f"is it a {w}", "choices": ["yes", "no"], "label": 0} for w in ("cat", "dog", "cow")]
    docs.append({"q": "what is it", "choices": ["a " * 60, "no"], "label": 1})
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "pool.jsonl").write_text("\n".join(json.dumps(d) for d in docs[:3]))
    (tmp_path / "t.json").write_text(json.dumps({"type": "multiple_choice", "data": "docs.jsonl", "pool": "pool.jsonl",
                                                 "template": "{q}?", "choices": "choices", "label": "label"}))
    assert main(["fewshot", run, "--task", str(tmp_path / "t.json"), "--shots", "0,2", "--json"]) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert [r["truncated"] for r in rows] == [1, 1] and rows[0]["examples"] == 4
    assert rows[1]["demos_used"] < 2 and "demonstrations fit the context window of 64 tokens" in out.err


def test_encode_pair_moves_trailing_spaces_to_the_continuation(tok):
    ctx, cont = encode_pair(tok, "question: ", "answer")
    assert tok.decode(ctx) == "question:" and tok.decode(cont) == " answer"
    assert encode_pair(tok, "", "ab") == ([tok.eot_id], tok.encode("ab"))


def test_exact_match_and_token_f1():
    assert token_f1("The loutre de mer.", "loutre de mer") == 1.0
    assert token_f1("loutre", "loutre de mer") == pytest.approx(0.5)
    assert token_f1("chat", "fromage") == 0.0


def _mc_files(folder):
    rng = random.Random(0)
    words = ["cat", "dog", "sun", "moon", "tree", "fish", "bird", "rock"]

    def record(i):
        choices = rng.sample(words, 3)
        return {"question": f"which is {choices[i % 3]}?", "choices": choices, "label": i % 3}

    (folder / "test.jsonl").write_text("".join(json.dumps(record(i)) + "\n" for i in range(24)))
    (folder / "train.jsonl").write_text(json.dumps(record(1)) + "\n")  # one demonstration: K=1 is deterministic
    (folder / "task.json").write_text(json.dumps({"type": "multiple_choice", "data": "test.jsonl",
                                                  "pool": "train.jsonl", "template": "{question}",
                                                  "choices": "choices", "label": "label"}))


def test_multiple_choice_accuracy_equals_lm_evaluation_harness(tmp_path, model, tok):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the dev extra")
    from lm_eval.tasks import TaskManager

    from gptn.integrations.lm_eval import GptnLM
    _lm_eval_task(tmp_path)
    ours_task = load_task_file(tmp_path / "task.json")
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    for k in (0, 1):
        res = lm_eval.simple_evaluate(model=GptnLM(model=model, tokenizer=tok), tasks=["gptn_local_mc"],
                                      num_fewshot=k, task_manager=manager, bootstrap_iters=0)["results"]["gptn_local_mc"]
        ours = evaluate_fewshot(model, tok, ours_task, k)
        assert ours.metrics["accuracy_sum"] == pytest.approx(res["acc,none"])
        assert ours.metrics["accuracy_per_char"] == pytest.approx(res["acc_norm,none"])


def test_gptn_lm_eval_runs_the_harness_command_line(tmp_path, run, model, tok, capsys):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the dev extra")
    _lm_eval_task(tmp_path)
    out = tmp_path / "results"
    assert main(["lm-eval", run, "--tasks", "gptn_local_mc", "--include_path", str(tmp_path / "tasks"),
                 "--num_fewshot", "1", "--output_path", str(out), "--batch_size", "4", "--model_args", "max_gen_toks=32"]) == 0
    (written,) = out.rglob("results_*.json")
    # the harness names the folder and model_name after pretrained=RUN (with run= it chose a random name)
    assert Path(run).name in written.parent.name
    assert Path(run).name in json.loads(written.read_text())["model_name"]
    res = json.loads(written.read_text())["results"]["gptn_local_mc"]
    ours = evaluate_fewshot(model, tok, load_task_file(tmp_path / "task.json"), 1)
    assert res["acc,none"] == pytest.approx(ours.metrics["accuracy_sum"])
    assert "gptn_local_mc" in capsys.readouterr().out  # the harness's own results table
    assert main(["lm-eval", run, "--model", "hf", "--tasks", "x"]) == 2


def _lm_eval_task(tmp_path):
    _mc_files(tmp_path)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local.yaml").write_text(
        lm_eval_mc_task("gptn_local_mc", tmp_path / "train.jsonl", tmp_path / "test.jsonl", ("acc", "acc_norm")))



def test_lm_eval_rolling_and_generation_follow_the_harness_contract(model, tok):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the dev extra")
    from lm_eval.api.instance import Instance

    from gptn.scoring import score
    from gptn.integrations.lm_eval import GptnLM
    lm = GptnLM(model=model, tokenizer=tok)
    text = "which is the moon? the moon is " * 6  # longer than the window
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert isinstance(rolling[0], float) and rolling[0] == pytest.approx(score(model, tok, text, stride=64).total_logprob)
    gen = lm.generate_until([Instance("generate_until", {}, ("which is", {"until": ["o"], "max_gen_toks": 5}), 0),
                             Instance("generate_until", {}, ("the", {"until": ["\n\n"], "max_gen_toks": 3}), 1)])
    assert "o" not in gen[0] and len(tok.encode(gen[0])) <= 5
    assert len(tok.encode(gen[1])) <= 3


@pytest.fixture
def run(tmp_path, model, tok):
    save_checkpoint(tmp_path / "run", model.config, model.state_dict(), tokenizer=tok)
    return str(tmp_path / "run")


def test_cli_prints_one_row_per_k_and_writes_records_and_plot(tmp_path, run, capsys):
    _mc_files(tmp_path)
    task = tmp_path / "task.json"
    args = ["fewshot", run, "--task", str(task), "--shots", "0,1", "--records", str(tmp_path / "r.jsonl"),
            "--plot", str(tmp_path / "k.png"), "--json"]
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["k"] for r in rows] == [0, 1] and rows[1]["demos_used"] == 1.0
    assert all(0 <= r["value"] <= 1 and r["examples"] == 24 for r in rows)
    records = [json.loads(line) for line in open(tmp_path / "r.jsonl")]
    assert len(records) == 48 and records[24]["prompt"].count("\n\n") == 1
    assert (tmp_path / "k.png").stat().st_size > 1000


def test_translation_and_cloze_kinds_run_end_to_end(tmp_path, model, tok):
    short = Task("en-fr", "generate", translation_task().docs, max_gen_tokens=4)  # fits the 64-token window
    result = evaluate_fewshot(model, tok, short, k=1)
    assert result.metric == "exact match" and result.examples == 3 and result.demos_used == 1
    assert all("output" in r for r in result.records)
    cloze = Task("cloze", "cloze", [Doc("the moon is", answers=["moon"]), Doc("which is", answers=["the"])], stop=[])
    r = evaluate_fewshot(model, tok, cloze, k=0)
    assert r.metrics["perplexity"] > 1 and r.value in (0.0, 0.5, 1.0)


@pytest.mark.parametrize("spec, message", [
    ({"type": "multiple_choice", "data": "test.jsonl", "template": "{question}", "choices": "choices"},
     "missing field(s) ['label']"),
    ({"type": "multiple_choice", "data": "test.jsonl", "template": "Question:", "choices": "choices",
      "label": "label"}, "no {field} placeholder"),
    ({"type": "multiple_choice", "data": "test.jsonl", "template": "{nope}", "choices": "choices",
      "label": "label"}, "needs field 'nope'"),
    ({"type": "essay", "data": "test.jsonl", "template": "{question}", "answer": "x"}, "is not one of"),
])
def test_bad_task_files_are_one_line_errors(tmp_path, run, capsys, spec, message):
    _mc_files(tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps(spec))
    assert main(["fewshot", run, "--task", str(tmp_path / "bad.json"), "--shots", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_k_larger_than_the_pool_is_a_clear_error(tmp_path, run, capsys):
    _mc_files(tmp_path)
    assert main(["fewshot", run, "--task", str(tmp_path / "task.json"), "--shots", "2"]) == 2
    assert "K=2 demonstrations asked for, but the pool has only 1" in capsys.readouterr().err


def test_builtin_tasks_read_the_shared_data(shared_data):
    lam = load_task("lambada", shared_data)
    assert lam.kind == "cloze" and len(lam.docs) == 5153 and " " not in lam.docs[0].answers[0]
    hs = load_task("hellaswag", shared_data)
    assert len(hs.docs) == 10042 and hs.docs[0].gold == 3 and hs.chance == 0.25
    sst = load_task("sst2", shared_data)
    assert len(sst.docs) == 872 and len(sst.pool) == 67349 and sst.docs[0].choices == ["negative", "positive"]
    assert sst.docs[0].query.startswith("it 's a charming") and sst.docs[0].gold == 1
    piqa = load_task("piqa", shared_data)
    labels = (shared_data / "piqa" / "valid-labels.lst").read_text().split()
    assert len(piqa.docs) == 1838 and piqa.chance == 0.5 and [str(d.gold) for d in piqa.docs] == labels
    assert piqa.docs[0].query == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.docs[0].choices[0].startswith("Provide the guinea pig with a cage full of a few inches of bedding")
    enfr = load_task("en-fr", shared_data)
    abc = next(d for d in enfr.docs if d.query == "ABC =>")
    assert abc.answers == ["abc", "alphabet"] and enfr.description == "Translate English to French:"
    with pytest.raises(GptnError, match="unknown task"):
        load_task("nosuchtask", shared_data)


def test_a_task_file_can_join_a_separate_labels_file(tmp_path, run, capsys):
    _mc_files(tmp_path)
    rows = [json.loads(ln) for ln in (tmp_path / "test.jsonl").read_text().splitlines()]
    (tmp_path / "unlabeled.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "label"}) + "\n"
                                                      for r in rows))
    (tmp_path / "labels.lst").write_text("".join(f"{r['label']}\n" for r in rows))
    spec = json.loads((tmp_path / "task.json").read_text())
    (tmp_path / "split.json").write_text(json.dumps({**spec, "data": "unlabeled.jsonl", "labels": "labels.lst"}))
    joined, whole = load_task_file(tmp_path / "split.json"), load_task_file(tmp_path / "task.json")
    assert [d.gold for d in joined.docs] == [d.gold for d in whole.docs] and joined.docs[5].query == whole.docs[5].query
    (tmp_path / "labels.lst").write_text("0\n1\n")
    assert main(["fewshot", run, "--task", str(tmp_path / "split.json"), "--shots", "0"]) == 2
    assert "has 2 labels for 24 examples" in capsys.readouterr().err


def test_an_output_path_that_cannot_be_written_is_refused_before_the_evaluation(tmp_path, run, capsys):
    _mc_files(tmp_path)
    task = tmp_path / "task.json"
    for flag, path in (("--records", "/no/such/folder/r.jsonl"), ("--plot", str(tmp_path)),
                       ("--records", str(tmp_path / "nope" / "r.jsonl"))):
        assert main(["fewshot", run, "--task", str(task), "--shots", "0", flag, path]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and flag in err  # nothing was evaluated
