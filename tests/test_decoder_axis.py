"""`--decoder full|frozen|lora:R`: counts by formula, identity at init, what trains, clear errors, the run name and
metrics.json, a grid axis, and runs that load_run, `export --format adapter` and the embedding cache still serve."""
import json

import pytest
import torch
import yaml
from segment_anything.modeling.transformer import Attention

import samfit
from samfit.config import RunConfig, make_config
from samfit.engine.train import run
from samfit.errors import SamfitError
from samfit.grid import load_grid
from samfit.methods.lora import LoRALinear
from samfit.model.decoder_lora import apply_decoder, decoder_attentions

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
DIM, CROSS = 256, 128  # SAM's decoder: width 256, its cross-attentions at 256 / 2 (downsample rate 2)


def lora_formula(rank: int, queries: int = 1) -> int:
    """LoRA on Linear(i, o) has r·(i + o). Each of SAM's two TwoWayAttentionBlocks has one self-attention (q, k, v:
    256→256, out 256→256) and two cross-attentions (q, k, v: 256→128, out 128→256); one more cross-attention follows
    them. Plus the trainable output tokens: the IoU token and the mask tokens, 256 each."""
    self_attn = 4 * rank * (DIM + DIM)
    cross = 3 * rank * (DIM + CROSS) + rank * (CROSS + DIM)
    return 2 * (self_attn + 2 * cross) + cross + DIM * (1 + queries)


def _counts(variant, method="lora", decoder="full", num_classes=1):
    with torch.device("meta"):
        model = samfit.get_method(method).apply(samfit.build_model(variant, num_classes=num_classes, image_size=256))
        return samfit.count_parameters(apply_decoder(model, decoder))


@pytest.mark.parametrize("variant", ["tiny", "vit_b", "vit_h"])
@pytest.mark.parametrize("rank", [1, 4])
def test_counts_follow_the_decoder_choice(variant, rank):
    full = _counts(variant)
    frozen = _counts(variant, decoder="frozen")
    lora = _counts(variant, decoder=f"lora:{rank}")
    assert full["decoder_trainable"] == 3_505_536 and frozen["decoder_trainable"] == 0
    assert lora["decoder_trainable"] == lora_formula(rank)
    assert full["encoder_trainable"] == frozen["encoder_trainable"] == lora["encoder_trainable"]
    assert lora["total"] == full["total"] + lora_formula(rank) - DIM * 2  # the tokens were already SAM's


def test_multiclass_head_keeps_its_class_head_trainable():
    """The class head has no SAM weights to keep (it starts random), so it trains with every decoder choice."""
    with torch.device("meta"):
        head = sum(p.numel() for p in samfit.build_model("tiny", num_classes=3).mask_decoder.class_head.parameters())
    assert _counts("tiny", decoder="frozen", num_classes=3)["decoder_trainable"] == head
    assert _counts("tiny", decoder="lora:2", num_classes=3)["decoder_trainable"] == lora_formula(2, 6) + head


def test_the_cli_lists_counts_for_the_decoder_choice(cli):
    code, out, message = cli("methods", "--model", "vit_b", "--decoder", "lora:4", "--json")
    assert code == 0, message
    rows = {r["method"]: r for r in json.loads(out)}
    assert rows["lora"]["decoder_trainable"] == lora_formula(4) and rows["lora"]["encoder_trainable"] == 110_592
    code, out, _ = cli("methods", "--model", "vit_b", "--decoder", "frozen", "--json")
    rows = {r["method"]: r for r in json.loads(out)}
    assert "decoder-only" not in rows and rows["lora"]["trainable"] == 110_592


@pytest.mark.parametrize("value, message", [("lora:0", "rank must be an integer >= 1"),
                                            ("lora:x", "rank must be an integer >= 1"),
                                            ("lora", "choose full, frozen or lora:R"),
                                            ("half", "choose full, frozen or lora:R")])
def test_bad_decoder_values_are_clear_errors(value, message):
    with pytest.raises(SamfitError, match=message):
        RunConfig(decoder=value)


def test_a_frozen_decoder_with_no_encoder_parts_is_an_error_before_any_work(tmp_path):
    with pytest.raises(SamfitError, match="--decoder frozen with method 'decoder-only': nothing would train"):
        RunConfig(method="decoder-only", decoder="frozen", image_size=64)
    path = tmp_path / "grid.yaml"  # a grid names the run when it is read, so `grid --dry-run` catches it too
    path.write_text(yaml.safe_dump({"defaults": {"model": "tiny", "dataset": "shapes", "decoder": "frozen"},
                                    "axes": {"method": ["lora", "decoder-only"]}}))
    with pytest.raises(SamfitError, match=r"run \(method=decoder-only\).*nothing would train"):
        load_grid(path, out=str(tmp_path / "out"))
    net = samfit.get_method("decoder-only").apply(samfit.build_model("tiny", image_size=64))
    with pytest.raises(SamfitError, match="nothing would train"):  # the model-level check stays as a safety net
        apply_decoder(net, "frozen")


def test_lora_wraps_every_decoder_attention_projection_and_is_sam_at_init():
    torch.manual_seed(0)
    plain = samfit.get_method("lora").apply(samfit.build_model("tiny", image_size=64))
    torch.manual_seed(0)
    model = apply_decoder(samfit.get_method("lora").apply(samfit.build_model("tiny", image_size=64)), "lora:3")
    attentions = [m for m in model.mask_decoder.modules() if isinstance(m, Attention)]
    assert len(attentions) == 7  # 2 blocks × (self + 2 cross) + the final cross-attention
    for attention in attentions:
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert isinstance(getattr(attention, proj), LoRALinear) and getattr(attention, proj).rank == 3
    trainable = {n for n, p in model.mask_decoder.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n} | {"iou_token.weight", "mask_tokens.weight"}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)["logits"], plain.eval()(x)["logits"])  # B = 0 adds an exact zero


def test_attentions_are_found_by_what_they_are_not_where_they_are():
    class RoPEAttention(Attention):  # another backbone's decoder attention, e.g. SAM 2's, somewhere else
        pass

    decoder = torch.nn.ModuleDict({"deep": torch.nn.ModuleList([RoPEAttention(256, 8, 2)]),
                                   "proj": torch.nn.Linear(4, 4)})
    assert [name for name, _ in decoder_attentions(decoder)] == ["deep.0"]


def _run(tmp_path, data_root, name, **kw):
    settings = dict(method="lora", dataset="shapes", model="tiny", image_size=64, epochs=1, limit_train=4,
                    limit_eval=2, batch_size=2, effective_batch=2, device="cpu", out=str(tmp_path / "runs"),
                    data_root=str(data_root), name=name)
    settings.update(kw)
    folder = run(make_config(**settings), quiet=True)
    return folder, json.loads((folder / "metrics.json").read_text())


def test_runs_record_the_choice_and_load_run_and_the_adapter_serve_them(tmp_path, data_root, cli):
    folder, metrics = _run(tmp_path, data_root, None, decoder="lora:2")
    assert folder.name == "shapes_lora_tiny_64_s0_dec-lora2"
    assert metrics["decoder"] == "lora:2" and metrics["params"]["decoder_trainable"] == lora_formula(2)
    assert yaml.safe_load((folder / "config.yaml").read_text())["decoder"] == "lora:2"
    best = torch.load(folder / "checkpoints" / "best.pt", weights_only=True)
    assert any(".lora_B" in k and k.startswith("mask_decoder.") and best[k].abs().max() > 0 for k in best)
    adapter = tmp_path / "run.safetensors"
    code, _, message = cli("export", folder, "--format", "adapter", "--out", adapter)
    assert code == 0, message
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loaded = samfit.load_run(folder, device="cpu")
        assert torch.equal(samfit.load_run(adapter, device="cpu")(x)["logits"], loaded(x)["logits"])
    frozen_dir, frozen = _run(tmp_path, data_root, None, decoder="frozen")
    assert frozen_dir.name.endswith("_dec-frozen") and frozen["params"]["decoder_trainable"] == 0
    assert not any(k.startswith("mask_decoder.") for k in torch.load(frozen_dir / "checkpoints" / "best.pt",
                                                                         weights_only=True))
    from samfit.report.collect import collect_runs

    labels = set(collect_runs(tmp_path / "runs")["method"])  # the table keeps the decoder choices apart
    assert labels == {"lora (decoder lora:2)", "lora (decoder frozen)"}


def test_the_embedding_cache_serves_a_lora_decoder_exactly(tmp_path, data_root):
    """The encoder stays frozen plain SAM, so decoder-only with lora:R caches, and equals the uncached run (one image
    per batch: tests/test_cache.py's EXACT)."""
    exact = dict(method="decoder-only", decoder="lora:2", batch_size=1, effective_batch=2, limit_train=4)
    _, cached = _run(tmp_path, data_root, "cached", cache_embeddings="on", **exact)
    _, plain = _run(tmp_path, data_root, "plain", cache_embeddings="off", **exact)
    assert cached["embedding_cache"]["enabled"] and cached["scores"] == plain["scores"]


def test_a_grid_axis_over_the_decoder(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"method": "lora", "model": "tiny", "dataset": "shapes"},
                                    "axes": {"decoder": ["full", "frozen", "lora:4"]}}))
    grid = load_grid(path, out=str(tmp_path / "out"))
    assert [r.decoder for r in grid.runs] == ["full", "frozen", "lora:4"]
    assert len({r.name for r in grid.runs}) == 3


def test_the_method_label_names_a_decoder_that_is_not_the_full_one():
    from samfit.config import method_label

    assert method_label("lora", {"blocks": "last:3"}, "lora:4") == "lora@last:3 (decoder lora:4)"
    assert method_label("lora", {}, "full") == method_label("lora", {}) == "lora"
    assert method_label("dora", {}, "frozen") == "dora (decoder frozen)"
