import json

import pytest

from gptn.cli import main
from gptn.compute import parameter_count, training_memory
from gptn.config import PRESETS, GPTConfig, GptnError, get_preset
from gptn.model import GPT


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates(name):
    preset = get_preset(name)
    cfg = GPTConfig.from_dict(preset.config.to_dict())  # re-runs __post_init__
    assert cfg.d_model == cfg.n_head * cfg.d_head
    assert cfg.d_ff == 4 * cfg.d_model


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("width", [64, 256, 1536])
def test_a_width_override_derives_d_ff_again(name, width):
    base = get_preset(name).config
    heads = {"n_head": 4} if width % base.n_head else {}
    assert base.replace(d_model=width, **heads).d_ff == 4 * width
    # An override that names d_ff too keeps it, and so does a d_ff the config set explicitly.
    assert base.replace(d_model=width, d_ff=3 * width, **heads).d_ff == 3 * width
    explicit = base.replace(d_ff=1000)
    assert explicit.replace(d_model=width, **heads).d_ff == 1000
    assert explicit.replace(dropout=0.0).d_ff == 1000


def test_pretraining_with_a_width_override_builds_the_derived_mlp(tmp_path):
    from gptn.data import prepare
    from gptn.pretrain import PretrainConfig, pretrain
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    prepare([str(tmp_path / "a.txt")], "char", tmp_path / "c", val_fraction=0.1, progress=False)
    pretrain(PretrainConfig(corpus=str(tmp_path / "c"), out=str(tmp_path / "r"), preset="mini",
                            overrides={"d_model": 64, "n_ctx": 16}, steps=1, batch_tokens=32, eval_interval=0,
                            progress=False))
    saved = json.loads((tmp_path / "r" / "checkpoint" / "config.json").read_text())
    assert (saved["d_model"], saved["d_ff"]) == (64, 256)  # mini is 128 wide: the old replace kept 512


def test_gpt3_inconsistencies_resolved_and_documented():
    xl, b13 = get_preset("gpt3-xl"), get_preset("gpt3-13b")
    assert (xl.config.d_model, xl.config.n_head, xl.config.d_head) == (2048, 16, 128)
    assert (b13.config.d_model, b13.config.n_head, b13.config.d_head) == (5120, 40, 128)
    assert "3072" in xl.note and "5140" in b13.note


@pytest.mark.parametrize("bad, message", [
    (dict(d_model=100, n_head=3), "not divisible"),
    (dict(norm="middle"), "norm"),
    (dict(attention="full"), "attention"),
    (dict(n_layer=0), "n_layer"),
    (dict(dropout=1.5), "dropout"),
])
def test_invalid_config_is_a_clear_error(bad, message):
    with pytest.raises(GptnError, match=message):
        GPTConfig(**bad)


@pytest.mark.parametrize("name", ["tiny", "gpt1", "gpt2", "small"])
def test_parameter_count_is_exact(name):
    cfg = PRESETS[name].config
    assert parameter_count(cfg) == GPT(cfg).num_parameters()
    no_bias = cfg.replace(bias=False, attention="sparse")
    if name == "tiny":
        assert parameter_count(no_bias) == GPT(no_bias).num_parameters()


def test_sizes_json_matches_gpt3_table_d1(capsys):
    assert main(["sizes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    gpt3 = [n for n in PRESETS if n.startswith("gpt3-")]
    assert len(gpt3) == 8
    for name in gpt3:
        r = rows[name]
        assert abs(r["params"] / r["paper_params"] - 1) < 0.01, name
        assert abs(r["flops_6nd"] / r["paper_flops"] - 1) < 0.03, name
        assert abs(r["pf_days_6nd"] / r["paper_pf_days"] - 1) < 0.03, name
    assert rows["gpt3-175b"]["flops_6nd"] == pytest.approx(3.14e23, rel=0.01)
    assert rows["gpt3-175b"]["pf_days_6nd"] == pytest.approx(3640, rel=0.01)
    assert rows["gpt3-small"]["flops_6nd"] == pytest.approx(2.25e20, rel=0.01)
    # Table 2.1's own figures beside ours: its rounded batches, and the two shapes it misprints
    assert [rows[n]["paper_batch"] for n in ("gpt3-small", "gpt3-xl", "gpt3-13b", "gpt3-175b")] == \
        ["0.5M", "1M", "2M", "3.2M"] and rows["gpt3-small"]["batch_tokens"] == 524288
    assert rows["gpt3-xl"]["paper_shape"] == {"n_head": 24} and rows["gpt3-xl"]["n_head"] == 16
    assert rows["gpt3-13b"]["paper_shape"] == {"d_model": 5140} and "5120" in rows["gpt3-13b"]["note"]
    assert main(["sizes"]) == 0
    text = capsys.readouterr().out
    assert "16*" in text and "5120*" in text and "* gpt3-xl: Table 2.1 prints 24 heads" in text
    assert rows["gpt3-small"]["pf_days_6nd"] == pytest.approx(2.60, rel=0.01)
    # The attention term adds most for small models with long contexts.
    small_extra = rows["gpt3-small"]["flops_with_attention"] / rows["gpt3-small"]["flops_6nd"]
    big_extra = rows["gpt3-175b"]["flops_with_attention"] / rows["gpt3-175b"]["flops_6nd"]
    assert small_extra > big_extra > 1


def test_compute_175b_is_about_ten_years_at_one_petaflop(capsys):
    assert main(["compute", "--preset", "gpt3-175b", "--tokens", "300e9", "--peak", "1e15", "--mfu", "1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["pf_days_6nd"] == pytest.approx(3640, rel=0.01)
    assert 9.5 < plan["years"] < 10.5
    mem = plan["memory_bytes"]
    assert mem["optimizer"] == 12 * plan["params"]
    assert mem["total_checkpointed"] < mem["total"]


def test_memory_estimate_grows_with_batch():
    cfg = PRESETS["gpt2"].config
    one, eight = training_memory(cfg, 1), training_memory(cfg, 8)
    assert eight.activations > 7 * (one.activations - 4 * cfg.n_ctx * cfg.vocab_size)
    assert eight.weights == one.weights


def test_unknown_preset_is_one_line_error(capsys):
    assert main(["compute", "--preset", "gpt5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown preset 'gpt5'" in err and "\n" not in err


def test_sizes_shows_each_generations_norm_and_data_and_the_lectures_slips(capsys):
    assert main(["sizes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert (rows["gpt1"]["norm"], rows["gpt1"]["final_layer_norm"]) == ("post", False)
    assert all(rows[n]["norm"] == "pre" and rows[n]["final_layer_norm"] for n in ("gpt2", "gpt2-xl", "gpt3-175b"))
    assert "BooksCorpus" in rows["gpt1"]["data"] and "WebText" in rows["gpt2-medium"]["data"]
    assert all(t in rows["gpt3-small"]["data"] for t in ("300B", "45 TB", "570 GB"))
    assert main(["sizes"]) == 0
    table = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in table.splitlines() if ln.split()}
    assert lines["gpt1"].endswith("post-LN") and lines["gpt3-175b"].endswith("pre-LN + final LN")
    assert "5140" in table and "10^15" in table and "570 GB" in table
