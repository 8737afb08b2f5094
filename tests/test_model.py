import pytest
import torch
import torch.nn.functional as F

from gptn.config import GPTConfig
from gptn.model import GPT, KVCache, next_token_loss


def tiny(**kw):
    base = dict(vocab_size=97, n_ctx=32, n_layer=3, n_head=4, d_model=32, dropout=0.0)
    base.update(kw)
    return GPTConfig(**base)


def test_forward_is_the_three_equations():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 97, (2, 10))
    h = model.wte(idx) + model.wpe(torch.arange(10))
    for block in model.h:
        h = block(h)
    expected = model.ln_f(h) @ model.wte.weight.T
    torch.testing.assert_close(model(idx), expected)
    logits, loss = model(idx[:, :-1], targets=idx[:, 1:])
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref)


def test_gpt1_is_post_norm_without_final_layernorm():
    model = GPT(tiny(norm="post"))
    assert model.ln_f is None
    x = torch.randn(1, 5, 32)
    block = model.h[0].eval()
    expected = block.ln_1(x + block.attn(x))
    expected = block.ln_2(expected + block.mlp(expected))
    torch.testing.assert_close(block(x), expected)


def test_causal_output_ignores_future_tokens():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    a = torch.randint(0, 97, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 97
    torch.testing.assert_close(model(a)[:, :8], model(b)[:, :8])
    assert not torch.allclose(model(a)[:, 8:], model(b)[:, 8:])


def test_weights_are_tied_and_residual_projections_scaled():
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=8, d_model=64))
    assert "lm_head" not in dict(model.named_parameters())
    std_proj = model.h[0].mlp.c_proj.weight.std().item()
    std_fc = model.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / 4) < 0.001  # 1/sqrt(2 * 8)


def _kv_parity(cfg):
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    full = model(idx)
    cache = KVCache(cfg, 2, cfg.n_ctx)
    steps = [model(idx[:, :7], cache=cache)]  # prefill
    for t in range(7, 20):  # then one token at a time
        steps.append(model(idx[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_matches_full_forward_pre_and_post_norm():
    _kv_parity(tiny())
    _kv_parity(tiny(norm="post"))


def test_kv_cache_matches_full_forward_sparse():
    _kv_parity(tiny(attention="sparse", sparse_band=4))


def test_sparse_banded_layers_see_only_the_band():
    torch.manual_seed(0)
    cfg = tiny(attention="sparse", sparse_band=4, n_layer=2)
    model = GPT(cfg).eval()
    banded, dense = model.h[1].attn, model.h[0].attn
    assert banded.banded and not dense.banded
    x = torch.randn(1, 12, 32)
    mask = model._attention_mask(12, 0, None, x.device)
    y1 = banded(x, mask)
    x2 = x.clone()
    x2[0, 0] += 1.0  # position 0 is outside the band of positions >= 4
    y2 = banded(x2, mask)
    torch.testing.assert_close(y1[:, 4:], y2[:, 4:])
    assert not torch.allclose(dense(x, mask)[:, 4:], dense(x2, mask)[:, 4:])


def test_left_padding_with_mask_and_positions_matches_unpadded():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    seq = torch.randint(0, 97, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(padded, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(out[:, 3:], model(seq), atol=1e-5, rtol=1e-5)


def test_last_only_logits():
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(model(idx, last_only=True), model(idx)[:, -1:])


@pytest.mark.parametrize("vocab", [97, 40_000])  # 40,000: the CPU loss runs over several chunks of rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_next_token_loss_matches_cross_entropy(dtype, vocab):
    """Eagerly on a CPU and under torch.compile the loss is our own autograd function; value and gradient
    must be F.cross_entropy's, without gradients too."""
    torch.manual_seed(0)
    logits = (torch.randn(3, 17, vocab) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (3, 17))
    targets[0, :4] = -100  # ignored positions count neither in the sum nor in the mean
    targets[1, :] = -100  # a whole sequence ignored
    ref = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1), ignore_index=-100)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    compiled = torch.compile(next_token_loss, backend="aot_eager", fullgraph=True)
    for loss_fn in (next_token_loss, compiled):
        loss = loss_fn(logits, targets)
        (grad,) = torch.autograd.grad(loss * 2, logits)  # the upstream gradient scales it
        torch.testing.assert_close(loss, ref)
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.float(), 2 * ref_grad.float(), atol=2e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(next_token_loss(logits, targets), ref)
