import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import gptn_cli as _cli
from conftest import kill_after_checkpoint, together
from gptn.checkpoint import save_checkpoint
from gptn.cli import main
from gptn.config import GPTConfig, GptnError
from gptn.finetune import (Example, FinetuneConfig, TaskModel, TaskSpec, collate, task_gpt,
                           compute_metrics, finetune, input_sequences, load_task_model, l3_loss, predict,
                           read_task_file)
from gptn.model import GPT
from gptn.task_types import MAX_WINDOWS, TASK_TYPES, TaskType, _truncate, windows
from gptn.tokenizer import DELIM, EXTRACT, START, CharTokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?'"


@pytest.fixture
def tok():
    return CharTokenizer.from_text(ALPHABET).add_special_tokens()


def ids(tok, text):
    return tok.encode(text)


def test_each_input_transformation_builds_gpt1_sequences(tok):
    s, d, e = (tok.special_tokens[t] for t in (START, DELIM, EXTRACT))
    assert input_sequences("classification", Example(("good",)), tok, 64) == [[s, *ids(tok, "good"), e]]
    assert input_sequences("entailment", Example(("a cat", "an animal")), tok, 64) == \
        [[s, *ids(tok, "a cat"), d, *ids(tok, "an animal"), e]]
    assert input_sequences("similarity", Example(("one", "two")), tok, 64) == \
        [[s, *ids(tok, "one"), d, *ids(tok, "two"), e], [s, *ids(tok, "two"), d, *ids(tok, "one"), e]]
    assert input_sequences("multiple_choice", Example(("ctx",), 0, ("x", "yz")), tok, 64) == \
        [[s, *ids(tok, "ctx"), d, *ids(tok, "x"), e], [s, *ids(tok, "ctx"), d, *ids(tok, "yz"), e]]
    # the literal token texts, for a reader
    (seq,) = input_sequences("entailment", Example(("ab", "c")), tok, 64)
    assert tok.decode(seq) == f"{START}ab{DELIM}c{EXTRACT}"


def test_over_long_inputs_lose_the_start_of_the_longest_segment(tok):
    assert _truncate([[1, 2, 3, 4, 5, 6], [7, 8]], 6, context_first=False) == [[3, 4, 5, 6], [7, 8]]
    assert _truncate([[1, 2, 3], [4, 5, 6]], 4, context_first=False) == [[2, 3], [5, 6]]
    assert _truncate([[1, 2, 3], [4, 5, 6]], 2, context_first=True) == [[], [5, 6]]
    (seq,) = input_sequences("classification", Example(("abcdefghij",)), tok, 6)
    assert len(seq) == 6 and tok.decode(seq[1:-1]) == "ghij"  # the end, nearest the extract token, is kept
    for choice in input_sequences("multiple_choice", Example(("abcdefgh",), 0, ("xy", "z")), tok, 8):
        assert len(choice) <= 8 and tok.decode(choice).endswith(EXTRACT)
        assert "fgh" in tok.decode(choice) or "efgh" in tok.decode(choice)


def test_windows_cover_a_long_input_and_head_keeps_its_start(tok):
    tokens = list(range(100))
    ws = windows(tokens, 20)
    assert all(len(w) == 20 for w in ws) and ws[0][0] == 0 and ws[-1][-1] == 99
    assert set().union(*map(set, ws)) == set(tokens)  # every token is read
    assert all(a[10] == b[0] or b[0] - a[0] <= 10 for a, b in zip(ws, ws[1:]))  # half-window overlap
    assert windows(tokens[:20], 20) == [tokens[:20]]
    many = windows(list(range(10_000)), 20)
    assert len(many) == MAX_WINDOWS and many[-1][-1] == 9_999
    s, e = tok.special_tokens[START], tok.special_tokens[EXTRACT]
    (head,) = input_sequences("classification", Example(("abcdefghij",)), tok, 6, long_inputs="head")
    assert tok.decode(head[1:-1]) == "abcd"
    seqs = input_sequences("classification", Example(("abcdefghij",)), tok, 6, long_inputs="windows")
    assert [tok.decode(q[1:-1]) for q in seqs] == ["abcd", "cdef", "efgh", "ghij"]
    assert all(q[0] == s and q[-1] == e for q in seqs)
    # entailment: the hypothesis whole in every window, the premise read in windows
    seqs = input_sequences("entailment", Example(("abcdefghij", "xy")), tok, 8, long_inputs="windows")
    assert [tok.decode(q) for q in seqs][0] == f"{START}abc{DELIM}xy{EXTRACT}"
    assert all(len(q) <= 8 and tok.decode(q).endswith(f"{DELIM}xy{EXTRACT}") for q in seqs)
    assert "".join(tok.decode(q[1:4]) for q in seqs[::2]).startswith("abc")


def test_a_long_inputs_prediction_depends_on_text_outside_the_last_window(tok):
    filler = "the rest of this review says nothing that matters at all " * 3  # longer than the context (48)
    a, b = Example(("great! " + filler,)), Example(("awful. " + filler,))
    for long_inputs, differ in (("windows", True), ("tail", False)):
        model = _task_model(tok, TaskSpec("classification", ["neg", "pos"], long_inputs=long_inputs))
        pa, pb = (predict(model, tok, [x])[0]["probs"]["pos"] for x in (a, b))
        assert (abs(pa - pb) > 1e-6) == differ, long_inputs
    # batched with short inputs, a long input gets the probabilities it gets alone
    model = _task_model(tok, TaskSpec("classification", ["neg", "pos"], long_inputs="windows"))
    alone = predict(model, tok, [a])[0]["probs"]["pos"]
    mixed = predict(model, tok, [Example(("short",)), a, Example(("also short",))], batch_size=4)
    assert mixed[1]["probs"]["pos"] == pytest.approx(alone, abs=1e-5)


def test_fine_tuning_with_windows_learns_a_label_written_before_the_last_window(tmp_path, pretrained_run, capsys):
    filler = " and then the film goes on for a long while, as films do"  # the last 46 characters (n_ctx 48)
    rows = ["sentence\tlabel"] + [f"{w}{filler}\t{'pos' if w in ('good', 'great') else 'neg'}"
                                   for w in ("good", "great", "bad", "awful") * 6]
    train = tmp_path / "train.tsv"
    train.write_text("\n".join(rows) + "\n")
    accuracy = {}
    for long_inputs in ("windows", "tail"):
        out = tmp_path / long_inputs
        assert main(["finetune", str(pretrained_run), "--train", str(train), "--out", str(out), "--epochs", "30",
                     "--batch-size", "8", "--lr", "3e-3", "--dropout", "0", "--head-dropout", "0", "--lm-weight", "0",
                     "--long-inputs", long_inputs, "--no-progress"]) == 0
        assert json.loads((out / "checkpoint" / "task.json").read_text())["long_inputs"] == long_inputs
        capsys.readouterr()
        assert main(["predict", str(out), str(train)]) == 0
        accuracy[long_inputs] = float(capsys.readouterr().out.rsplit("accuracy ", 1)[1].split(",")[0])
    assert accuracy == {"windows": 1.0, "tail": 0.5}  # the tail is the same text for every label
    # predict --long-inputs overrides the run's own setting: the windows model read by its tail
    assert main(["predict", str(tmp_path / "windows"), str(train), "--long-inputs", "tail"]) == 0
    assert "accuracy 0.5000" in capsys.readouterr().out


def test_train_windows_one_reads_one_window_of_each_long_input_each_epoch(tok, tmp_path):
    from gptn.finetune import TaskObjective
    from gptn.runtime import Dist
    spec = TaskSpec("classification", ["neg", "pos"], long_inputs="windows")
    model = _task_model(tok, spec)
    filler = " and then the film goes on for a long while, as films do"
    examples = [Example((w + filler * 3,), "pos" if w == "good" else "neg") for w in ("good", "bad", "fine", "dull")]
    seqs = [spec.sequences(x, tok, model.gpt.config) for x in examples]
    assert min(map(len, seqs)) > 2

    def objective(train_windows):
        cfg = FinetuneConfig(run="-", out="-", train="-", train_windows=train_windows, batch_size=4, seed=3)
        return TaskObjective(cfg, model, tok, seqs, torch.zeros(4, dtype=torch.long), None, 0.5, 1, tmp_path, Dist(), {})

    def sequences_read(obj, epoch):  # one step per epoch here
        parts = list(obj.micro_batches(epoch))
        assert sum(p[2] for p in parts) == pytest.approx(1.0) and sum(p[3] for p in parts) == pytest.approx(1.0)
        return sum(len(p[0].groups) for p in parts), sum(len(p[0].ids) for p in parts)

    assert sequences_read(objective("all"), 0) == (4, sum(map(len, seqs)))  # every window of every example
    one = objective("one")
    assert all(sequences_read(one, epoch) == (4, 4) for epoch in range(3))  # one window of each
    draws = [[one._read(i, epoch) for i in range(4)] for epoch in range(6)]
    assert all(len(w) == 1 and w[0] in seqs[i] for drawn in draws for i, w in enumerate(drawn))
    assert len({str(drawn) for drawn in draws}) > 1  # another draw in another epoch
    # a function of the seed, the epoch and the example: a resumed run (a new objective) draws alike
    assert [[objective("one")._read(i, epoch) for i in range(4)] for epoch in range(6)] == draws


def _task_model(tok, spec, seed=0):
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=48, n_layer=2, n_head=2, d_model=32, dropout=0.0))
    return TaskModel(gpt, spec, head_dropout=0.0).eval()


def test_similarity_is_symmetric_in_a_and_b(tok):
    model = _task_model(tok, TaskSpec("similarity", regression=True))
    ab = collate([input_sequences("similarity", Example(("a man runs", "someone is running")), tok, 48)], tok.eot_id)
    ba = collate([input_sequences("similarity", Example(("someone is running", "a man runs")), tok, 48)], tok.eot_id)
    with torch.no_grad():
        out_ab, _ = model(ab, with_lm_loss=False)
        out_ba, _ = model(ba, with_lm_loss=False)
    torch.testing.assert_close(out_ab, out_ba)


def test_multiple_choice_is_invariant_to_the_order_of_candidates(tok):
    model = _task_model(tok, TaskSpec("multiple_choice"))
    choices = ("the dog barks", "a cat", "rain falls down", "no")
    perm = (2, 0, 3, 1)
    x = Example(("what happens?",), 0, choices)
    y = Example(("what happens?",), perm.index(0), tuple(choices[i] for i in perm))
    p_x, p_y = predict(model, tok, [x])[0]["probs"], predict(model, tok, [y])[0]["probs"]
    torch.testing.assert_close(torch.tensor([p_y[perm.index(i)] for i in range(4)]), torch.tensor(p_x))


def test_auxiliary_lm_loss_changes_the_gradient_and_vanishes_at_zero(tok):
    model = _task_model(tok, TaskSpec("classification", ["neg", "pos"]))
    batch = collate([input_sequences("classification", Example((t,)), tok, 48) for t in ("good film", "bad")],
                    tok.eot_id)
    targets = torch.tensor([1, 0])

    def grad(lm_weight):
        model.zero_grad()
        loss, parts = l3_loss(model, model.spec, batch, targets, lm_weight)
        loss.backward()
        return model.gpt.h[0].mlp.c_fc.weight.grad.clone(), loss, parts["task_loss"], parts.get("lm_loss")

    g0, loss0, task0, lm0 = grad(0.0)
    g5, loss5, task5, lm5 = grad(0.5)
    assert lm0 is None and loss0.item() == task0.item()
    torch.testing.assert_close(loss5, task5 + 0.5 * lm5)
    assert not torch.allclose(g0, g5)
    model.zero_grad()
    l3_loss(model, model.spec, batch, targets, 0.5)[1]["task_loss"].backward()  # L2 alone gives the λ = 0 gradient
    torch.testing.assert_close(model.gpt.h[0].mlp.c_fc.weight.grad, g0)


def test_lm_loss_of_a_padded_batch_is_the_mean_over_its_real_tokens(tok):
    model = _task_model(tok, TaskSpec("classification", ["neg", "pos"])).eval()
    seqs = [input_sequences("classification", Example((t,)), tok, 48) for t in ("a rather long review", "bad")]
    alone = [model(collate([s], tok.eot_id))[1] for s in seqs]  # each sequence unpadded
    counts = [len(s[0]) - 1 for s in seqs]
    batched = model(collate(seqs, tok.eot_id))[1]
    assert counts[0] > counts[1]  # the short one is padded in the batch
    torch.testing.assert_close(batched, sum(c * x for c, x in zip(counts, alone)) / sum(counts))


def test_special_tokens_grow_the_embedding_and_keep_pretrained_rows(tmp_path):
    tok = CharTokenizer.from_text(ALPHABET)
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=16, n_layer=1, n_head=1, d_model=8))
    save_checkpoint(tmp_path / "pre", gpt.config, gpt.state_dict(), tokenizer=tok)
    grown, grown_tok = task_gpt(FinetuneConfig(run=str(tmp_path / "pre"), train="t", out="o", dropout=0.2), False)
    assert grown.config.vocab_size == gpt.config.vocab_size + 3 == grown_tok.vocab_size and grown.config.dropout == 0.2
    torch.testing.assert_close(grown.wte.weight[:gpt.config.vocab_size], gpt.wte.weight)
    torch.testing.assert_close(grown.h[0].attn.c_attn.weight, gpt.h[0].attn.c_attn.weight)
    assert 0.005 < grown.wte.weight[gpt.config.vocab_size:].std() < 0.05  # the new rows: N(0, 0.02), not zeros


def test_from_scratch_never_reads_the_source_weights(tmp_path):
    """--from-scratch needs the source's shape and tokenizer only: its weights may even be unreadable."""
    tok = CharTokenizer.from_text(ALPHABET)
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=16, n_layer=1, n_head=1, d_model=8))
    save_checkpoint(tmp_path / "pre", gpt.config, gpt.state_dict(), tokenizer=tok)
    (tmp_path / "pre" / "checkpoint" / "model.safetensors").write_bytes(b"damaged")
    scratch, _ = task_gpt(FinetuneConfig(run=str(tmp_path / "pre"), train="t", out="o", from_scratch=True), False)
    assert scratch.config.n_layer == 1 and not torch.allclose(scratch.h[0].attn.c_attn.weight, gpt.h[0].attn.c_attn.weight)
    with pytest.raises(GptnError, match="model.safetensors"):
        task_gpt(FinetuneConfig(run=str(tmp_path / "pre"), train="t", out="o"), False)


def _write_separable(path, n=40):
    rows = ["sentence\tlabel"]
    words = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad"]
    for i in range(n):
        w = words[i % 8]
        rows.append(f"the {w} movie\t{'pos' if i % 8 < 4 else 'neg'}")
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture
def pretrained_run(tmp_path):
    tok = CharTokenizer.from_text(ALPHABET)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=48, n_layer=2, n_head=2, d_model=32, dropout=0.0))
    save_checkpoint(tmp_path / "pre", gpt.config, gpt.state_dict(), tokenizer=tok)
    return tmp_path / "pre"


def test_tiny_model_fits_a_separable_task_and_predicts(tmp_path, pretrained_run, capsys):
    train = tmp_path / "train.tsv"
    _write_separable(train)
    summary = finetune(FinetuneConfig(run=str(pretrained_run), out=str(tmp_path / "ft"), train=str(train),
                                      val=str(train), epochs=20, batch_size=8, lr=3e-3, dropout=0.0,
                                      head_dropout=0.0, progress=False))
    assert summary["task"] == "classification" and summary["best"]["value"] == 1.0
    model, tok = load_task_model(tmp_path / "ft")
    assert model.spec.labels == ["neg", "pos"]
    records = predict(model, tok, read_task_file(train).examples)
    assert all(r["prediction"] == r["label"] for r in records)

    assert main(["predict", str(tmp_path / "ft"), "--text", "the awful movie", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prediction"] == "neg" and out["probs"]["neg"] > 0.5
    assert main(["predict", str(tmp_path / "ft"), str(train)]) == 0
    assert "accuracy 1.0000" in capsys.readouterr().out
    # --device auto is resolved like every other command's (it reached model.to("auto") before)
    assert main(["predict", str(tmp_path / "ft"), "--text", "the awful movie", "--json", "--device", "auto"]) == 0
    assert json.loads(capsys.readouterr().out)["prediction"] == "neg"


def test_a_new_task_type_is_one_class(tmp_path, pretrained_run, monkeypatch):
    # A type no code path names: reads only the first word of the text. Registering the class is all
    # it takes to fine-tune, save, load and predict with it.
    from gptn.tasks import Columns

    class FirstWord(TaskType):
        name = "first_word"

        def sequences(self, segments, choices, marks, n_ctx, long_inputs):
            s, _, e = marks
            first = segments[0][:segments[0].index(space)] if space in segments[0] else segments[0]
            return [[s, *first[:n_ctx - 2], e]]

    monkeypatch.setitem(TASK_TYPES, "first_word", FirstWord())
    tok = CharTokenizer.from_text(ALPHABET).add_special_tokens()
    (space,) = tok.encode(" ")
    s, e = tok.special_tokens[START], tok.special_tokens[EXTRACT]
    assert input_sequences("first_word", Example(("good movie",)), tok, 48) == [[s, *tok.encode("good"), e]]
    train = tmp_path / "train.jsonl"
    words = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad"]
    # the label is in the first word only: the rest of the text says the opposite half the time
    train.write_text("".join(json.dumps({"text": f"{w} {words[(i + 4) % 8]} movie", "label": "pos" if i % 8 < 4 else "neg"})
                             + "\n" for i, w in enumerate(words * 5)))
    summary = finetune(FinetuneConfig(run=str(pretrained_run), out=str(tmp_path / "ft"), train=str(train),
                                      val=str(train), task="first_word", columns=Columns(text_col="text", label_col="label"),
                                      epochs=20, batch_size=8, lr=3e-3, dropout=0.0, head_dropout=0.0, progress=False))
    assert summary["task"] == "first_word" and summary["best"]["value"] == 1.0
    model, ft_tok = load_task_model(tmp_path / "ft")
    assert model.spec.kind is TASK_TYPES["first_word"]
    records = predict(model, ft_tok, [Example(("awful good movie",)), Example(("nice sad movie",))])
    assert [r["prediction"] for r in records] == ["neg", "pos"]


def test_activation_checkpointing_fine_tunes_the_same_model(tmp_path, pretrained_run, capsys):
    train = tmp_path / "train.tsv"
    _write_separable(train, n=16)
    results = []
    for flag in ([], ["--activation-checkpointing"]):
        out = tmp_path / f"ft{len(results)}"
        assert main(["finetune", str(pretrained_run), "--train", str(train), "--out", str(out), "--epochs", "1",
                     "--batch-size", "8", "--lr", "3e-3", "--seed", "3", "--no-progress", *flag]) == 0
        results.append(load_task_model(out)[0].state_dict())
    for name, value in results[0].items():
        torch.testing.assert_close(value, results[1][name], atol=1e-6, rtol=1e-5)


def test_without_val_the_final_model_is_kept_and_nothing_is_scored(tmp_path, pretrained_run, capsys):
    # A separable task is fitted within a few epochs: keeping the best training-set score (as before) kept that
    # early epoch, not the model the whole schedule trains.
    train = tmp_path / "train.tsv"
    _write_separable(train)
    assert main(["finetune", str(pretrained_run), "--train", str(train), "--out", str(tmp_path / "ft"), "--epochs", "8",
                 "--batch-size", "8", "--lr", "3e-3", "--dropout", "0", "--head-dropout", "0", "--no-progress"]) == 0
    assert "40 examples, 40 steps" in (out := capsys.readouterr().out) and "the final model (no --val)" in out
    meta = json.loads((tmp_path / "ft" / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == 40 and meta["value"] is None
    logged = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in logged) and not any(k.startswith(("val_", "train_eval")) for r in logged for k in r)
    assert main(["predict", str(tmp_path / "ft"), "--text", "the awful movie"]) == 0
    assert capsys.readouterr().out.split("\t")[0] == "neg"


def test_cli_finetunes_multiple_choice_from_jsonl(tmp_path, pretrained_run, capsys):
    rows = [{"context": "pick the vowel", "endings": ["b", "a", "c"], "label": 1},
            {"context": "pick the vowel", "endings": ["e", "d", "f"], "label": 0},
            {"context": "pick the vowel", "endings": ["g", "h", "i"], "label": 2}] * 4
    f = tmp_path / "mc.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["finetune", str(pretrained_run), "--train", str(f), "--val", str(f), "--out", str(tmp_path / "mc"),
                 "--epochs", "30", "--batch-size", "4", "--lr", "3e-3", "--dropout", "0", "--head-dropout", "0",
                 "--no-progress"]) == 0
    assert "multiple_choice" in capsys.readouterr().out
    assert main(["predict", str(tmp_path / "mc"), "--text", "pick the vowel", "--choice", "c", "--choice", "a"]) == 0
    assert capsys.readouterr().out.split("\t")[0] == "1"


def test_glue_and_hellaswag_layouts_are_recognised(shared_data):
    glue = shared_data / "glue"
    sst = read_task_file(glue / "SST-2" / "dev.tsv")
    assert (sst.task, sst.regression, len(sst.examples)) == ("classification", False, 872)
    assert sst.examples[0] == Example(("it 's a charming and often affecting journey .",), "1")
    rte = read_task_file(glue / "RTE" / "dev.tsv")
    assert rte.task == "entailment" and rte.examples[0].label == "not_entailment"
    assert rte.examples[0].segments[1] == "Christopher Reeve had an accident."
    mrpc = read_task_file(glue / "MRPC" / "dev.tsv")
    assert mrpc.task == "similarity" and not mrpc.regression and {x.label for x in mrpc.examples} == {"0", "1"}
    sts = read_task_file(glue / "STS-B" / "dev.tsv")
    assert sts.task == "similarity" and sts.regression and sts.examples[0].label == 5.0
    hs = read_task_file(shared_data / "hellaswag" / "hellaswag_val_full.txt")
    assert hs.task == "multiple_choice" and len(hs.examples) == 10042
    assert hs.examples[0].label == 3 and len(hs.examples[0].choices) == 4
    assert hs.examples[0].segments == ("Roof shingle removal: A man is sitting on a roof. he",)


def test_metrics_on_hand_computed_cases():
    spec = TaskSpec("similarity", ["0", "1"])
    m = compute_metrics(spec, ["1", "1", "0", "0"], ["1", "0", "0", "1"])
    assert m == {"accuracy": 0.5, "f1": 0.5}  # tp 1, fp 1, fn 1
    reg = compute_metrics(TaskSpec("similarity", regression=True), [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])
    assert reg["pearson"] == pytest.approx(0.8) and reg["spearman"] == pytest.approx(0.8)
    ties = compute_metrics(TaskSpec("similarity", regression=True), [1.0, 1.0, 2.0], [1.0, 2.0, 3.0])
    assert ties["spearman"] == pytest.approx(0.8660254)  # ranks (1.5, 1.5, 3) vs (1, 2, 3)


@pytest.mark.parametrize("args, message", [
    (["--train", "MISSING.tsv"], "does not exist"),
    (["--train", "{bad}"], "unrecognised layout"),
    (["--train", "{one}"], "only one label"),
    (["--train", "{train}", "--task", "entailment", "--text-col", "sentence"], "second text column"),
    (["--train", "{train}", "--lr", "-1"], "lr must be positive"),
    (["--train", "{train}", "--layer-lr-decay", "1.5"], "layer_lr_decay must be in (0, 1]"),
])
def test_bad_finetune_input_is_one_line(tmp_path, pretrained_run, capsys, args, message):
    (tmp_path / "bad.tsv").write_text("foo\tbar\n1\t2\n")
    (tmp_path / "one.tsv").write_text("sentence\tlabel\nabc\tpos\nab\tpos\n")
    _write_separable(tmp_path / "train.tsv")
    args = [a.format(bad=tmp_path / "bad.tsv", one=tmp_path / "one.tsv", train=tmp_path / "train.tsv") for a in args]
    assert main(["finetune", str(pretrained_run), "--out", str(tmp_path / "o"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_predict_refuses_a_run_that_was_not_fine_tuned(pretrained_run, capsys):
    assert main(["predict", str(pretrained_run), "--text", "abc"]) == 2
    assert "not a fine-tuned run" in capsys.readouterr().err


def test_bad_rows_name_the_file_and_line(tmp_path):
    f = tmp_path / "x.tsv"
    f.write_text("sentence\tlabel\nok\t1\nbroken row\n")
    with pytest.raises(GptnError, match=r"x.tsv:3"):
        read_task_file(f)
    j = tmp_path / "mc.jsonl"
    j.write_text(json.dumps({"context": "c", "endings": ["a", "b"], "label": 5}) + "\n")
    with pytest.raises(GptnError, match="outside 0..1"):
        read_task_file(j)


def _final_state(run):
    model, _ = load_task_model(run)
    return model.state_dict()


def test_resume_after_sigkill_is_exact(tmp_path, pretrained_run):
    train = tmp_path / "train.tsv"
    _write_separable(train, n=400)
    common = ["finetune", str(pretrained_run), "--train", str(train), "--epochs", "3", "--batch-size", "4",
              "--lr", "1e-3", "--checkpoint-interval", "5", "--evals-per-epoch", "2", "--no-progress"]
    # The run uninterrupted, and the same run SIGKILLed once it has a resumable checkpoint past step 20, then
    # started again.
    full, killed_at = together(lambda: _cli(*common, "--out", str(tmp_path / "full")),
                               lambda: kill_after_checkpoint([*common, "--out", str(tmp_path / "killed")],
                                                             tmp_path / "killed" / "resume" / "checkpoint" /
                                                             "meta.json", 20))
    assert full.returncode == 0, full.stderr
    assert 20 <= killed_at < 300, "the run finished before it could be killed; make it longer"
    # ... and a killed run is resumed only with its own options.
    resumed, _ = together(lambda: _cli(*common, "--out", str(tmp_path / "killed")),
                          lambda: kill_after_checkpoint([*common, "--out", str(tmp_path / "other")],
                                                        tmp_path / "other" / "resume" / "checkpoint" / "meta.json", 0))
    assert resumed.returncode == 0, resumed.stderr
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "killed" / "resume").exists()  # a finished run leaves only its best checkpoint
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 301))
    changed = _cli(*common[:-1], "--lr", "2e-3", "--out", str(tmp_path / "other"), "--no-progress")
    assert changed.returncode == 2 and "other options (lr)" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1


def test_two_ranks_equal_one_rank_with_accumulation(tmp_path, pretrained_run):
    train = tmp_path / "train.tsv"
    _write_separable(train, n=36)  # 5 steps of 8, the last one short (4 examples)
    common = ["finetune", str(pretrained_run), "--train", str(train), "--epochs", "1", "--batch-size", "8",
              "--micro-batch", "2", "--lr", "3e-3", "--lm-weight", "0.5", "--dropout", "0", "--head-dropout", "0",
              "--no-progress"]  # no dropout: ranks draw their masks from other streams
    # one rank with 4 micro-batches of 2 a step, and 2 ranks with 2 micro-batches of 2 each
    one, two = together(lambda: _cli(*common, "--out", str(tmp_path / "one")),
                        lambda: _cli(*common, "--out", str(tmp_path / "two"), ranks=2))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _final_state(tmp_path / "one"), _final_state(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
    pre = load_file(str(pretrained_run / "checkpoint" / "model.safetensors"))  # the weights did move
    assert not torch.equal(pre["h.0.mlp.c_fc.weight"], a["gpt.h.0.mlp.c_fc.weight"])


def test_bf16_autocast_fine_tunes_on_cpu(tmp_path, pretrained_run):
    train = tmp_path / "train.tsv"
    _write_separable(train)
    summary = finetune(FinetuneConfig(run=str(pretrained_run), out=str(tmp_path / "ft"), train=str(train),
                                      val=str(train), epochs=20, batch_size=8, lr=3e-3, dropout=0.0,
                                      head_dropout=0.0, precision="bf16", progress=False))
    assert summary["best"]["value"] == 1.0
    records = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] / 4


def test_measuring_the_matmul_peak_leaves_the_seeded_random_stream_alone():
    # bf16-or-not and MFU are measured once per process with random matrices; drawn from the global
    # generator, they shifted the dropout and head initialisation of whichever seeded run came first.
    from gptn.runtime import measure_matmul_peak
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    measure_matmul_peak(torch.device("cpu"), torch.float32, n=64, seconds=0.01)
    assert torch.equal(torch.rand(4), expected)
