import pytest
import torch

from gptn.config import GPTConfig
from gptn.model import GPT
from gptn.optim import Muon, MuonWithAdamW, make_optimizer, orthogonalize

CONFIG = GPTConfig(vocab_size=50, n_ctx=16, n_layer=2, n_head=2, d_model=16)


def test_weight_decay_on_matrices_only():
    model = GPT(CONFIG)
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_muon_takes_the_linear_weights_and_adamw_the_rest():
    model = GPT(CONFIG)
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu", "muon", muon_lr=0.02)
    assert isinstance(opt, MuonWithAdamW)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert muon == linear and len(linear) == 4 * CONFIG.n_layer
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert id(model.wte.weight) in adamw and id(model.wpe.weight) in adamw  # W_e is the tied softmax too
    assert muon.isdisjoint(adamw) and len(muon | adamw) == len(list(model.parameters()))
    assert opt.muon.param_groups[0]["lr_scale"] == pytest.approx(20.0)


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_layer_lr_decay_gives_lower_blocks_smaller_steps(kind):
    # Discriminative rates: one step of each optimizer moves block 0 (of 2) decay^2 as far as the final LayerNorm,
    # and the embeddings decay^3 as far, measured on the weights themselves after a real backward.
    torch.manual_seed(0)
    model = GPT(CONFIG.replace(dropout=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, 1e-3, 0.0, (0.9, 0.95), "cpu", kind, muon_lr=0.02, layer_decay=0.1)
    for group in opt.param_groups:  # what the training loop does each step
        group["lr"] = 1e-3 * group["lr_scale"]
    x = torch.randint(0, 50, (4, 16))
    model(x, x)[1].backward()
    opt.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    top = moved["ln_f.weight"]
    for name, scale in (("h.1.ln_1.weight", 0.1), ("h.0.ln_2.bias", 0.01), ("wpe.weight", 0.001)):
        assert moved[name] == pytest.approx(top * scale, rel=1e-3)  # Adam's first step: the rate, per element
    if kind == "muon":  # Muon's steps scale the same way (an orthogonalised gradient: about the same size per block)
        assert moved["h.0.mlp.c_fc.weight"] == pytest.approx(moved["h.1.mlp.c_fc.weight"] * 0.1, rel=0.3)


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 48)])
def test_orthogonalize_is_close_to_u_v_transposed(shape):
    g = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    o = orthogonalize(g)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    uv = u @ vh
    cosine = (o * uv).sum((-2, -1)) / (o.norm(dim=(-2, -1)) * uv.norm(dim=(-2, -1)))
    assert (cosine > 0.97).all()
    assert torch.linalg.svdvals(o).max() < 1.25  # the quintic overshoots 1 a little, by design


def test_muon_matches_pytorchs_muon():
    # torch.optim.Muon orthogonalises in bfloat16, ours in float32 on CPU: equal to ~1%.
    shapes = [(96, 32), (32, 32), (128, 32), (32, 128)] * 2
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    start = [p.detach().clone() for p in ours]
    a = Muon(ours, lr=0.02, weight_decay=0.1)
    b = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for params, opt in ((ours, a), (theirs, b)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for p, q, s in zip(ours, theirs, start):
        moved_ours, moved_theirs = p.detach() - s, q.detach() - s
        assert (moved_ours - moved_theirs).norm() / moved_theirs.norm() < 0.03


def test_muon_reaches_a_lower_loss_in_the_same_steps():
    text = torch.randint(0, 50, (4000,), generator=torch.Generator().manual_seed(0))
    text = torch.cat([text[:200]] * 20)  # a repeating sequence: learnable by heart

    def train(kind):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=50, n_ctx=32, n_layer=2, n_head=2, d_model=32, dropout=0.0))
        opt = make_optimizer(model, 3e-3, 0.0, (0.9, 0.95), "cpu", kind, muon_lr=0.02)
        gen = torch.Generator().manual_seed(1)
        for _ in range(60):
            i = torch.randint(0, text.numel() - 33, (8,), generator=gen)
            w = torch.stack([text[j:j + 33] for j in i.tolist()])
            for g in opt.param_groups:
                g["lr"] = 3e-3 * g["lr_scale"]
            _, loss = model(w[:, :-1], w[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.item()

    adamw, muon = train("adamw"), train("muon")
    assert muon < adamw - 0.3, (muon, adamw)
