import json

import pytest
import torch
import torch.nn.functional as F

from gptn.checkpoint import save_checkpoint
from gptn.cli import main
from gptn.config import GPTConfig
from gptn.generate import generate, generate_ids, next_token_probs
from gptn.sampling import SamplingConfig, choose_tokens, filter_logits
from gptn.scoring import score
from gptn.inference import _CpuInferenceLinear, decode_step, prepare_for_inference
from gptn.model import GPT, KVCache
from gptn.slots import DecodeView, PrefillView, SlotCache
from gptn.tokenizer import CharTokenizer
from gptn.runtime import native_bf16


@pytest.fixture
def run(tmp_path, model, tok):
    save_checkpoint(tmp_path / "run", model.config, model.state_dict(), tokenizer=tok)
    return str(tmp_path / "run")


def test_greedy_matches_hugging_face_generate(tmp_path, run):
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    assert main(["export-hf", run, str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    from gptn.checkpoint import load_model
    model, _ = load_model(run)
    for prompt in ([3, 7, 1], [5], list(range(10))):
        ours = generate_ids(model, [prompt], SamplingConfig(max_new_tokens=20, greedy=True))[0]
        theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, min_new_tokens=20,
                             pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
        assert ours == theirs


def test_batched_mixed_lengths_equal_one_at_a_time(model):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [4, 4, 2]]
    cfg = SamplingConfig(max_new_tokens=15, greedy=True)
    batched = generate_ids(model, prompts, cfg)
    alone = [generate_ids(model, [p], cfg)[0] for p in prompts]
    assert batched == alone


def test_seeded_sampling_is_reproducible(model, tok):
    cfg = SamplingConfig(max_new_tokens=30, temperature=1.3, seed=42)
    a = generate(model, tok, ["the ", "a"], cfg, num_samples=2)
    b = generate(model, tok, ["the ", "a"], cfg, num_samples=2)
    assert a == b
    c = generate(model, tok, ["the ", "a"], SamplingConfig(max_new_tokens=30, temperature=1.3, seed=7), num_samples=2)
    assert c != a


def test_top_k_and_top_p_never_leave_their_set():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = probs.log().repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    k2 = torch.multinomial(filter_logits(logits, 2, None).softmax(-1), 1, generator=g)
    assert set(k2.unique().tolist()) == {0, 1}
    p = torch.multinomial(filter_logits(logits, None, 0.8).softmax(-1), 1, generator=g)  # 0.5 + 0.2 + 0.15 >= 0.8
    assert set(p.unique().tolist()) == {0, 1, 2}
    p1 = torch.multinomial(filter_logits(logits, None, 0.5).softmax(-1), 1, generator=g)
    assert set(p1.unique().tolist()) == {0}
    both = torch.multinomial(filter_logits(logits, 3, 0.6).softmax(-1), 1, generator=g)
    assert set(both.unique().tolist()) == {0, 1}


def test_stop_strings_and_sliding_window(model, tok, capsys):
    out = generate(model, tok, ["abc"], SamplingConfig(max_new_tokens=200, greedy=True))[0][0]
    assert len(out) == 200  # 3 + 200 > n_ctx = 48: the window slid, no crash
    assert "sliding the window" in capsys.readouterr().err
    stop = out[10:12]
    cut = generate(model, tok, ["abc"], SamplingConfig(max_new_tokens=200, greedy=True, stop=[stop]))[0][0]
    assert stop not in cut and out.startswith(cut) and len(cut) <= 10 + len(stop)


def test_streaming_gives_the_same_text(model, tok):
    pieces = []
    text = generate(model, tok, ["hello"], SamplingConfig(max_new_tokens=25, seed=3),
                    stream=lambda row, t: pieces.append(t))[0][0]
    assert "".join(pieces) == text and len(pieces) > 1


def test_next_token_probabilities_are_the_softmax(model, tok):
    rows = next_token_probs(model, tok, "the cat", top=5)
    with torch.no_grad():
        probs = model(torch.tensor([tok.encode("the cat")]))[0, -1].softmax(-1)
    assert [r["id"] for r in rows] == probs.topk(5).indices.tolist()
    assert rows[0]["prob"] == pytest.approx(probs.max().item(), rel=1e-5)
    assert all(a["prob"] >= b["prob"] for a, b in zip(rows, rows[1:]))


def test_score_matches_a_direct_computation_and_windows(model, tok):
    text = "the quick brown fox jumps over the lazy dog. " * 3  # longer than n_ctx = 48
    s = score(model, tok, text, stride=16)
    assert len(s.logprobs) == len(tok.encode(text))
    ids = [tok.eot_id] + tok.encode(text)
    with torch.no_grad():
        lp = model(torch.tensor([ids[:40]])).log_softmax(-1)[0]
    direct = [lp[i, ids[i + 1]].item() for i in range(39)]
    assert s.logprobs[:39] == pytest.approx(direct, abs=1e-4)
    assert s.perplexity == pytest.approx(torch.tensor(s.logprobs).neg().mean().exp().item(), rel=1e-6)
    full = score(model, tok, text, stride=48)
    assert full.logprobs[:47] == pytest.approx(s.logprobs[:47], abs=1e-4)


def test_cli_next_generate_score(run, capsys, tmp_path):
    assert main(["next", run, "the ca", "--top", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and set(rows[0]) == {"token", "id", "prob"}
    assert main(["generate", run, "--prompt", "the", "--max-new-tokens", "10", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("the")
    assert main(["generate", run, "--prompt", "", "--prompt", "ab", "--greedy", "--max-new-tokens", "5"]) == 0
    assert "sample 1" in capsys.readouterr().out
    (tmp_path / "t.txt").write_text("the cat sat.")
    assert main(["score", run, str(tmp_path / "t.txt"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["tokens"] == 12 and s["bits_per_byte"] > 0


@pytest.mark.parametrize("args, message", [
    (["--top-p", "0"], "top_p"), (["--top-p", "1.5"], "top_p"), (["--temperature", "-1"], "temperature"),
])
def test_bad_sampling_options(run, capsys, args, message):
    assert main(["generate", run, "--prompt", "a", *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_run_directory(capsys, tmp_path):
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "a"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_long_prompt_keeps_its_end(model, tok, capsys):
    long = "abcdefghij" * 10  # 100 > n_ctx
    out = generate(model, tok, [long], SamplingConfig(max_new_tokens=5, greedy=True))[0][0]
    tail = generate(model, tok, [long[-47:]], SamplingConfig(max_new_tokens=5, greedy=True))[0][0]
    assert out == tail and "longer than the context" in capsys.readouterr().err


def test_reordered_linear_matches_linear_and_follows_a_changed_weight():
    torch.manual_seed(0)
    for out_features, bias in ((1024, True), (1027, False)):  # even and odd widths, with and without a bias
        linear = torch.nn.Linear(256, out_features, bias=bias)  # past ONEDNN_MIN_WORK from one row on
        fast = _CpuInferenceLinear(linear.weight, linear.bias)
        with torch.no_grad():
            for shape in ((1, 256), (2, 1, 256), (8, 256), (3, 100, 256)):  # one row, two, a batch, a prefill
                x = torch.randn(shape)
                torch.testing.assert_close(fast(x), linear(x), atol=1e-5, rtol=1e-4)
            linear.weight.mul_(2)  # a weight changed after reordering is read again, not the stale copy
            torch.testing.assert_close(fast(x), linear(x), atol=1e-5, rtol=1e-4)


def test_the_one_row_kernel_matches_linear_and_runs_where_it_is_chosen():
    import shutil

    from gptn import cpu_gemv, inference
    from gptn.runtime import cpu_vendor_and_flags
    if not {"avx2", "fma"} <= cpu_vendor_and_flags()[1] or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("cpu_gemv's kernel needs an x86 CPU with AVX2 + FMA and a C compiler")
    assert cpu_gemv.available()  # built here (every CPU kind the project runs on has both)
    torch.manual_seed(0)
    # rows in blocks of 4 and a short last block; columns in steps of 16 and a tail; gpt2's shapes
    for out_features, in_features in ((1, 16), (5, 3), (7, 37), (130, 100), (2304, 768), (768, 3072)):
        w, b = torch.randn(out_features, in_features), torch.randn(out_features)
        for x in (torch.randn(1, in_features), torch.randn(1, 1, in_features)):
            for bias in (b, None):
                torch.testing.assert_close(cpu_gemv.gemv(x, w, bias), torch.nn.functional.linear(x, w, bias),
                                           atol=1e-4, rtol=1e-5)
    one_row = inference._CpuInferenceLinear(w, b).kernel(1)(x[0])
    assert torch.equal(one_row, cpu_gemv.gemv(x[0], w, b)) == inference._gemv_for_one_row()


def test_prepacked_cpu_inference_gives_the_same_results(tok):
    torch.manual_seed(1)
    plain = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=48, n_layer=2, n_head=2, d_model=32, dropout=0.0)).eval()
    packed = GPT(plain.config).eval()
    packed.load_state_dict(plain.state_dict())
    prepare_for_inference(packed)
    assert all(isinstance(m.forward, _CpuInferenceLinear) for m in packed.modules() if isinstance(m, torch.nn.Linear))
    x = torch.randint(0, tok.vocab_size, (4, 3))
    with torch.no_grad():
        for rows in (x, x[:1, :1], x[:, :1], torch.randint(0, tok.vocab_size, (2, 40))):  # a batch, 1 row, 4 rows, a prefill
            torch.testing.assert_close(packed(rows), plain(rows), atol=1e-5, rtol=1e-5)
    prompts = [[1, 2, 3], [4], [5, 6]]
    cfg = SamplingConfig(max_new_tokens=20, greedy=True)
    assert generate_ids(packed, prompts, cfg) == generate_ids(plain, prompts, cfg)


def twin_models(tok):
    """A small fp32 GPT and a copy of it, to be prepared at another dtype."""
    torch.manual_seed(1)
    plain = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=48, n_layer=2, n_head=2, d_model=64, dropout=0.0)).eval()
    copy = GPT(plain.config)
    copy.load_state_dict(plain.state_dict())
    return plain, copy


@pytest.mark.parametrize("dtype, tol", [("bf16", 0.02), ("fp16", 0.002), ("int8", 0.05)])
def test_bf16_fp16_and_int8_weights_decode_close_to_fp32(tok, dtype, tol):
    plain, fast = twin_models(tok)
    prepare_for_inference(fast, dtype)
    x = torch.randint(0, tok.vocab_size, (4, 12))
    with torch.no_grad():
        for rows in (x, x[:1, :1], torch.randint(0, tok.vocab_size, (2, 40))):
            want, got = plain(rows), fast(rows).float()
            assert (got - want).abs().max() <= tol * want.abs().max()
            assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    prompts = [[1, 2, 3], [4], [5, 6]]
    out = generate_ids(fast, prompts, SamplingConfig(max_new_tokens=12, greedy=True))
    assert [len(o) for o in out] == [12, 12, 12]
    # The fp32 weights stay for training: with gradients, the exact fp32 function.
    torch.testing.assert_close(fast(x), plain(x))


def test_a_bf16_decode_step_keeps_fp32_activations_at_any_batch(tok):
    # Prompt processing may run in bf16 where the CPU has it; a decode step (one position per row) never
    # rounds its activations, however many rows: that rounding is what flipped near-tied greedy picks.
    _, fast = twin_models(tok)
    prepare_for_inference(fast, "bf16")
    lin = fast.h[0].mlp.c_fc
    w, b = lin.weight.detach().bfloat16(), None if lin.bias is None else lin.bias.detach()
    step, prompt = torch.randn(100, 1, lin.in_features), torch.randn(2, 40, lin.in_features)
    with torch.no_grad():
        torch.testing.assert_close(lin(step), F.linear(step, w.float(), b), atol=1e-4, rtol=1e-4)
        if native_bf16():
            want = F.linear(prompt.bfloat16(), w, None if b is None else b.bfloat16()).float()
        else:
            want = F.linear(prompt, w.float(), b)
        torch.testing.assert_close(lin(prompt).float(), want, atol=0.02, rtol=0.02)


def test_bf16_prompts_stay_bf16_close_to_fp32_attention(tok):
    # On a CPU with native bf16, a prompt's linear outputs stay bf16 (each reader rounds them to bf16 anyway, or adds
    # them exactly to the fp32 residual stream) and its attention runs in bf16: the KV cache and logits (fp32) come out
    # close to those of converting every output back to fp32 (attention in fp32).
    _, fast = twin_models(tok)
    prepare_for_inference(fast, "bf16")
    x = torch.randint(0, tok.vocab_size, (2, 40))
    linears = [m.forward for m in fast.modules() if isinstance(m, torch.nn.Linear)]

    def prefill():
        cache = KVCache(fast.config, 2, 48)
        with torch.no_grad():
            return fast(x, cache=cache), cache.k[:, :, :, :40].clone(), cache.v[:, :, :, :40].clone()
    kept = prefill()
    assert kept[0].dtype == kept[1].dtype == torch.float32
    with torch.no_grad():
        qkv = fast.h[0].attn.c_attn(torch.randn(2, 40, fast.config.d_model))
    assert qkv.dtype == (torch.bfloat16 if linears[0].prompt_path is not None else torch.float32)
    for forward in linears:
        forward.bf16_out = False
    converted = prefill()
    # the first layer's keys and values are the same numbers; what follows a bf16 attention is close
    assert torch.equal(kept[1][0], converted[1][0]) and torch.equal(kept[2][0], converted[2][0])
    for a, b in zip(kept, converted):
        torch.testing.assert_close(a, b, atol=0.02 * b.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [None, "fp32", "bf16", "fp16", "int8"])
def test_decode_step_computes_the_model_bit_for_bit(dtype):
    # The lean decode step writes out GPT.forward for one position: the same logits and KV cache, to the bit, for
    # generate's rows at one position and the engine's each at its own, for one row and for four (d_model 256:
    # fp32's oneDNN kernels run too, not only F.linear; see MKL_MAX_ROWS).
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, n_ctx=32, n_layer=2, n_head=4, d_model=256, dropout=0.0)).eval()
    if dtype:
        prepare_for_inference(model, dtype)
    for rows in (1, 4):
        step = decode_step(model, rows)
        caches = [KVCache(model.config, rows, 32) for _ in range(2)]
        x = torch.randint(0, 300, (rows, 9))
        with torch.no_grad():
            for cache in caches:
                model(x[:, :5], cache=cache)
            for t in range(5, 9):
                want = model(x[:, t:t + 1], cache=caches[0])[:, -1]
                got = step(x[:, t], caches[1])
                assert torch.equal(want, got) and caches[0].length == caches[1].length == t + 1
        assert torch.equal(caches[0].k[:, :, :, :9], caches[1].k[:, :, :, :9])
        assert torch.equal(caches[0].v[:, :, :, :9], caches[1].v[:, :, :, :9])
        # as the serving engine decodes: each row at its own position in a slot cache, under a mask
        slots = [SlotCache(model.config, rows, "cpu", torch.float32) for _ in range(2)]
        pos = torch.tensor([3, 7, 5, 6][:rows])
        with torch.no_grad():
            for cache in slots:
                for r, n in enumerate(pos.tolist()):
                    model(x[r:r + 1, :n], cache=PrefillView(cache, r, 0))
            for t in range(3):
                span = int(pos.max()) + 1
                mask = (torch.arange(span)[None, None, :] <= pos[:, None, None])[:, None]
                want = model(x[:, t:t + 1], position_ids=pos[:, None], attention_mask=mask,
                             cache=DecodeView(slots[0], pos, span))[:, -1]
                got = step(x[:, t], DecodeView(slots[1], pos, span), pos, mask)
                assert torch.equal(want, got)
                pos = pos + 1
        assert torch.equal(slots[0].k, slots[1].k) and torch.equal(slots[0].v, slots[1].v)


def test_decode_step_only_where_it_computes_the_model(tok, monkeypatch):
    plain, _ = twin_models(tok)
    assert decode_step(plain, 1) is not None
    for other in (dict(norm="post"), dict(attention="sparse", sparse_band=4), dict(arch="bert")):
        assert decode_step(GPT(plain.config.replace(**other)).eval(), 1) is None
    assert decode_step(plain.train(), 1) is None
    prepare_for_inference(plain.eval(), "int8")
    with torch.no_grad():
        plain.h[0].mlp.c_fc.weight.mul_(2)  # changed since it was quantised: the int8 copy is stale
    assert decode_step(plain, 1) is None
    # generate uses it: the same tokens without it, past a slide of the context window too
    _, fast = twin_models(tok)
    prepare_for_inference(fast, "int8")
    greedy = SamplingConfig(max_new_tokens=60, greedy=True)
    with_step = generate_ids(fast, [[1, 2, 3], [4, 5, 6]], greedy, warn=lambda m: None)
    import gptn.generate
    monkeypatch.setattr(gptn.generate, "decode_step", lambda model, rows: None)
    assert generate_ids(fast, [[1, 2, 3], [4, 5, 6]], greedy, warn=lambda m: None) == with_step


def test_half_precision_without_fbgemm_casts_the_whole_model(tok, monkeypatch):
    # What CUDA runs for bf16 / fp16, and a CPU whose torch has no fbgemm (ARM) for bf16: weights, activations
    # and the KV cache in the half type; sampling, scores and probabilities still come out as fp32.
    import gptn.inference as inference
    monkeypatch.setattr(inference, "_fbgemm", lambda: False)
    plain, half = twin_models(tok)
    assert prepare_for_inference(half, "bf16") is half and half.wte.weight.dtype == torch.bfloat16
    x = torch.randint(0, tok.vocab_size, (2, 40))
    with torch.no_grad():
        want, got = plain(x), half(x).float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    out = generate_ids(half, [[1, 2, 3], [4]], SamplingConfig(max_new_tokens=30, greedy=True))
    assert [len(o) for o in out] == [30, 30]
    seeded = SamplingConfig(max_new_tokens=30, seed=3, top_p=0.9)
    assert generate_ids(half, [[1, 2, 3]], seeded) == generate_ids(half, [[1, 2, 3]], seeded)
    text = "the quick brown fox jumps over the lazy dog"
    assert score(half, tok, text).perplexity == pytest.approx(score(plain, tok, text).perplexity, rel=0.05)
    rows = next_token_probs(half, tok, "the cat", top=3)
    assert isinstance(rows[0]["prob"], float) and sum(r["prob"] for r in rows) <= 1 + 1e-6


def test_dtype_flag_on_the_command_line(run, capsys):
    assert main(["generate", run, "--prompt", "the", "--max-new-tokens", "6", "--greedy", "--dtype", "int8"]) == 0
    assert len(capsys.readouterr().out) > 0
    assert main(["next", run, "the", "--dtype", "auto"]) == 0
    assert "--dtype auto: " in capsys.readouterr().err  # says what it picked
    assert main(["score", run, "--text", "the cat", "--dtype", "fp8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fp32, bf16, fp16, int8, auto" in err
    assert main(["generate", run, "--prompt", "a", "--device", "cuda", "--dtype", "int8"]) == 2
    assert "CPU path" in capsys.readouterr().err


def test_a_tiny_temperature_or_top_p_samples_the_most_likely_token(model, tok):
    # logits / 1e-247 overflows to inf; the sampler must still give a distribution (found by test_fuzz).
    from gptn.generate import generate
    from gptn.sampling import SamplingConfig
    greedy = generate(model, tok, ["the "], SamplingConfig(max_new_tokens=8, greedy=True))
    assert generate(model, tok, ["the "], SamplingConfig(max_new_tokens=8, temperature=7e-247, seed=0)) == greedy
    # And a top_p that rounds to 0 keeps the most likely token rather than none.
    assert generate(model, tok, ["the "], SamplingConfig(max_new_tokens=8, top_p=1.9e-121, seed=0)) == greedy


@pytest.mark.parametrize("penalty", [2.2250738585e-313, 1e-39, 1e300])
def test_an_extreme_repetition_penalty_still_samples(penalty):
    # 1 / 2e-313 overflows the penalised logits to inf, and inf - inf made nan probabilities (found by test_fuzz).
    torch.manual_seed(0)
    logits, seen = torch.randn(2, 10), torch.arange(10).repeat(2, 1)  # every token already seen
    tokens, _ = choose_tokens(logits, SamplingConfig(repetition_penalty=penalty), seen=seen)
    assert tokens.shape == (2,) and ((0 <= tokens) & (tokens < 10)).all()


def test_the_python_api_refuses_what_would_be_silently_wrong():
    from gptn.config import GptnError
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=16, n_layer=1, n_head=1, d_model=8, dropout=0.0)).eval()
    with pytest.raises(GptnError, match="list of strings"):
        generate(model, tok, "the", SamplingConfig(max_new_tokens=2))  # not one prompt per character
    assert SamplingConfig(stop="END").stop == ["END"]  # one stop string, not E, N and D
    for bad in (dict(greedy="no"), dict(stop=[""]), dict(stop=[1]), dict(logit_bias=[1])):
        with pytest.raises(GptnError):
            SamplingConfig(**bad)
    with pytest.raises(GptnError, match="outside the vocabulary"):
        generate(model, tok, [[tok.vocab_size + 5]], SamplingConfig(max_new_tokens=2))
    with pytest.raises(GptnError, match="num_samples"):
        generate(model, tok, ["a"], num_samples=0)
