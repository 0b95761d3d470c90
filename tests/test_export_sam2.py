"""`samfit export --format sam` for SAM 2: short sam2_hiera_t runs (64 px, from a random checkpoint written in the
official SAM 2.1 layout by Meta's own builder) exported and loaded strictly by `sam2.build_sam.build_sam2` from its
own config; the file has the source's keys and shapes, the untouched tensors bitwise the source's, the trained ones
load_run's merged weights; and the sam2-built model computes what the run computes (its image encoder's features
and, with its decoder cut to mask token 0, the run's mask logits, against the unmerged run in float64); refusals."""
import json
import re

import numpy as np
import pytest
import torch
from test_sam2 import official_sam2, one_mask_token, reference_low_res

import samfit
from samfit.config import make_config
from samfit.engine.train import run
from samfit.model.sam2_load import to_official_key, to_samfit_key

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64
CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
# (method, --decoder): LoRA on the encoder; SSF with a decoder LoRA (both folded in by the export)
RUNS = {"lora": ("lora", "full"), "ssf-declora": ("ssf", "lora:4"), "adapter": ("adapter", "full"),
        "multiclass": ("lora", "full")}
# the merged weights are rounded to float32 in the file (relative eps/2 each); everything else runs in float64 but
# for FpnNeck's float32 upsampling, the same on both sides; measured: at most 0.81 eps relative to the largest
# value; an export without the merge, or without the decoder's transformer, is off by more than 390,000 eps
TOLERANCE = 64 * torch.finfo(torch.float32).eps


class Runs(dict):
    """{name: run folder}, each trained on first use (two images, one step)."""

    def __init__(self, tmp, checkpoint):
        super().__init__()
        self.tmp, self.checkpoint = tmp, checkpoint

    def __missing__(self, name):
        method, decoder = RUNS[name]
        dataset = "shapes-multiclass" if name == "multiclass" else "shapes"
        self[name] = run(make_config(method=method, decoder=decoder, dataset=dataset, model="sam2_hiera_t",
                                     checkpoint=str(self.checkpoint), image_size=SIZE, epochs=1, limit_train=2,
                                     limit_eval=1, batch_size=2, effective_batch=2, lr=1e-2, device="cpu",
                                     out=str(self.tmp / "runs"), data_root=str(self.tmp / "data")), quiet=True)
        return self[name]


@pytest.fixture(scope="module")
def hiera_t(tmp_path_factory):
    """(the runs, the source checkpoint: SAM2Base of the official 2.1 tiny config, every weight random)."""
    tmp = tmp_path_factory.mktemp("export_sam2")
    checkpoint = tmp / "sam2.1_hiera_tiny.pt"
    torch.save({"model": official_sam2([], size=1024).state_dict()}, checkpoint)
    return Runs(tmp, checkpoint), checkpoint


def sam2_from(path):
    """SAM2Base built by Meta's builder from its own config at 64 px, `path` loaded strictly."""
    from sam2.build_sam import build_sam2

    return build_sam2(CONFIG, str(path), device="cpu", mode="eval",
                      hydra_overrides_extra=[f"++model.image_size={SIZE}"], apply_postprocessing=False)


def relative(got, expected) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.slow  # a hiera_t run, exports of its 149 MB checkpoint, two sam2 builds: 6-12 s
@pytest.mark.parametrize("name", ["lora", "ssf-declora"])
def test_exported_sam2_run_is_an_official_checkpoint_computing_the_run(name, hiera_t, tmp_path, cli):
    runs, checkpoint = hiera_t
    folder = runs[name]
    assert json.loads((folder / "metrics.json").read_text())["sam_checkpoint"]["path"] == str(checkpoint.resolve())
    out = tmp_path / "exported.pt"
    code, _, message = cli("export", folder, "--format", "sam", "--out", out)
    assert code == 0, message
    file = torch.load(out, weights_only=True)
    source = torch.load(checkpoint, weights_only=True)["model"]
    assert list(file) == ["model"]
    exported = file["model"]
    assert {k: (v.shape, v.dtype) for k, v in exported.items()} == {k: (v.shape, v.dtype) for k, v in source.items()}
    official = sam2_from(out)  # build_sam2 loads strictly: a missing or unexpected key raises

    # the run's merged weights, key by key, named by hand for the renamed ones
    merged = samfit.load_run(folder, device="cpu", merge=True).state_dict()
    renamed = {"image_encoder.trunk.blocks.0.attn.qkv.weight": "image_encoder.blocks.0.attn.qkv.weight",
               "image_encoder.trunk.blocks.3.mlp.layers.1.weight": "image_encoder.blocks.3.mlp.lin2.weight",
               "image_encoder.trunk.pos_embed": "image_encoder.pos_embed",
               "no_mem_embed": "image_encoder.no_mem_embed",
               "image_encoder.neck.convs.0.conv.weight": "image_encoder.neck.convs.0.conv.weight",
               "sam_mask_decoder.conv_s0.weight": "mask_decoder.conv_s0.weight",
               "sam_mask_decoder.obj_score_token.weight": "mask_decoder.obj_score_token.weight"}
    for key, ours in renamed.items():
        assert torch.equal(exported[key], merged[ours]), key
    for ours, value in merged.items():
        key = to_official_key(ours)
        if ours == "mask_decoder.mask_tokens.weight":
            assert torch.equal(exported[key][0], value[0]) and torch.equal(exported[key][1:], source[key][1:])
        elif not ours.startswith("prompt_encoder."):
            assert torch.equal(exported[key], value), key
    untouched = [k for k in source if to_samfit_key(k) is None or k.startswith("sam_prompt_encoder.")
                 or k.startswith("sam_mask_decoder.output_hypernetworks_mlps.") and "_mlps.0." not in k]
    assert any(k.startswith("memory_attention.") for k in untouched) and any(".iou_prediction_head." in k
                                                                             for k in untouched)
    assert all(torch.equal(exported[k], source[k]) for k in untouched)
    changed = {k for k in source if not torch.equal(exported[k], source[k])}
    assert "image_encoder.trunk.blocks.0.attn.qkv.weight" in changed  # LoRA merged in (SSF: its scale and shift)
    assert "sam_mask_decoder.transformer.layers.0.self_attn.q_proj.weight" in changed  # the trained decoder
    assert all(k.startswith(("image_encoder.", "sam_mask_decoder.")) for k in changed)

    # what sam2's model computes against the run itself, unmerged (its own LoRA/SSF modules), both in float64
    model = samfit.load_run(folder, device="cpu").double()
    official.double()
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        embedding, s4, s8 = model.image_encoder(x)
        fpn = official.image_encoder(x)["backbone_fpn"]
        theirs = [fpn[0], fpn[1], fpn[2] + official.no_mem_embed.reshape(1, -1, 1, 1)]
        for got, expected in zip(theirs, [s4, s8, embedding]):
            assert got.shape == expected.shape and relative(got, expected) <= TOLERANCE
        plain = samfit.build_model("sam2_hiera_t", image_size=SIZE, checkpoint=checkpoint).double().eval()
        assert relative(plain.image_encoder(x)[0], embedding) > 1e4 * TOLERANCE  # the trained method shows
        expected = model(x)["mask_logits"]
        got = reference_low_res(one_mask_token(official), x)  # SAM 2's decoder on mask token 0 and MLP 0 only
        assert got.shape == expected.shape and relative(got, expected) <= TOLERANCE
    official.float()
    predictor_checks(out)
    if name == "lora":  # the run's adapter file exports to the same file
        code, _, message = cli("export", folder, "--format", "adapter", "--out", tmp_path / "lora.safetensors")
        assert code == 0, message
        code, _, message = cli("export", tmp_path / "lora.safetensors", "--format", "sam", "--out", tmp_path / "a.pt")
        assert code == 0, message
        again = torch.load(tmp_path / "a.pt", weights_only=True)["model"]
        assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in exported)


def predictor_checks(path):
    """SAM2ImagePredictor on the exported file with a box: SAM 2's whole promptable path runs on it."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(sam2_from(path))
    predictor._bb_feat_sizes = [(SIZE // 4,) * 2, (SIZE // 8,) * 2, (SIZE // 16,) * 2]  # written for 1024 px
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    with torch.no_grad():
        predictor.set_image(image)
        masks, scores, _ = predictor.predict(box=np.array([8, 8, 40, 48]), multimask_output=True)
    assert masks.shape == (3, SIZE, SIZE) and np.isfinite(scores).all()


@pytest.mark.slow  # three hiera_t runs and a sam2_tiny run: ~8 s
def test_sam2_refusals(hiera_t, tmp_path, cli):
    runs, checkpoint = hiera_t
    code, _, message = cli("export", runs["adapter"], "--format", "sam", "--out", tmp_path / "a.pt")
    assert code == 2 and "trained method 'adapter', which cannot be merged" in message
    assert "--format adapter" in message and not (tmp_path / "a.pt").exists()
    code, _, message = cli("export", runs["multiclass"], "--format", "sam", "--out", tmp_path / "m.pt")
    assert code == 2 and re.search(r"mask-classification head \(\d+ classes\)", message)
    assert "--format adapter" in message
    code, _, message = cli("export", runs["lora"], "--format", "sam", "--out", checkpoint)
    assert code == 2 and "is the SAM checkpoint" in message
    tiny = run(make_config(method="lora", dataset="shapes", model="sam2_tiny", image_size=SIZE, epochs=1,
                           limit_train=2, limit_eval=1, batch_size=2, effective_batch=2, device="cpu",
                           out=str(tmp_path / "runs"), data_root=str(runs.tmp / "data")), quiet=True)
    code, _, message = cli("export", tiny, "--format", "sam", "--out", tmp_path / "t.pt")
    assert code == 2 and "model 'sam2_tiny', which has no official SAM checkpoint" in message
    assert "--format adapter works for any run" in message
