"""The prompt-free SAM 2 segmenter against SAM 2's own image path (Meta's sam2 package: SAM2Base built by
build_sam2 from its own configs, SAM2ImagePredictor), on the same weights written as an official-format
checkpoint ({"model": state} in SAM2Base's key layout)."""
import numpy as np
import pytest
import torch

import samfit
from samfit import SamfitError
from samfit.methods.base import missing_features
from samfit.model.backbones import normalisation, resolve_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64
# sam2_tiny, written out as hydra overrides of the official 2.1 tiny config (this test's own copy)
TINY = ["++model.image_encoder.trunk.embed_dim=16", "++model.image_encoder.trunk.num_heads=1",
        "++model.image_encoder.trunk.stages=[1,1,2,1]", "++model.image_encoder.trunk.global_att_blocks=[3]",
        "++model.image_encoder.trunk.window_spec=[8,4,4,2]",
        "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
        "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]"]


def official_sam2(overrides, size=SIZE, seed=0):
    """SAM2Base from Meta's own 2.1 tiny config (with `overrides`), every weight random and non-zero."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu", mode="eval",
                       hydra_overrides_extra=[f"++model.image_size={size}", *overrides], apply_postprocessing=False)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.05 + (p if p.any() else 0))
    return model


def one_mask_token(official):
    """SAM 2's decoder cut as the prompt-free segmenter's (token 0 and MLP 0 only), in place: its other three
    mask tokens take part in the two-way transformer's token self-attention, so the cut changes token 0's
    output, and a comparison must run the official decoder on the same cut weights."""
    d = official.sam_mask_decoder
    d.mask_tokens = torch.nn.Embedding.from_pretrained(d.mask_tokens.weight[0:1].detach().clone(), freeze=False)
    d.output_hypernetworks_mlps = d.output_hypernetworks_mlps[0:1]
    d.num_mask_tokens = 1
    return official


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    official = official_sam2(TINY)
    path = tmp_path_factory.mktemp("sam2") / "sam2_tiny_official.pt"
    torch.save({"model": official.state_dict()}, path)
    return one_mask_token(official), path


def reference_low_res(official, images):
    """SAM2ImagePredictor.set_image's features and _predict's decoder call with no prompt (float64: the dense
    PE built on a float64 grid, SAM 2's own `_pe_encoding`; its grid values are exact in either dtype)."""
    out = official.forward_image(images)
    _, feats, _, sizes = official._prepare_backbone_features(out)
    feats[-1] = feats[-1] + official.no_mem_embed
    feats = [f.permute(1, 2, 0).reshape(images.shape[0], -1, *s) for f, s in zip(feats, sizes)]
    prompt = official.sam_prompt_encoder
    h, w = prompt.image_embedding_size
    ys, xs = torch.meshgrid((torch.arange(h, dtype=images.dtype) + 0.5) / h,
                            (torch.arange(w, dtype=images.dtype) + 0.5) / w, indexing="ij")
    pe = prompt.pe_layer._pe_encoding(torch.stack([xs, ys], dim=-1)).permute(2, 0, 1)[None]
    masks = []
    for i in range(images.shape[0]):
        sparse, dense = prompt(points=None, boxes=None, masks=None)
        low, _, _, _ = official.sam_mask_decoder(
            image_embeddings=feats[-1][i:i + 1], image_pe=pe, sparse_prompt_embeddings=sparse.to(images.dtype),
            dense_prompt_embeddings=dense, multimask_output=False, repeat_image=False,
            high_res_features=[f[i:i + 1] for f in feats[:-1]])
        masks.append(low)
    return torch.cat(masks)


def test_matches_sam2_decoder_call_in_float64(tiny_pair):
    official, path = tiny_pair
    ours = samfit.build_model("sam2_tiny", image_size=SIZE, checkpoint=path).double().eval()
    official = official.double()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        expected = reference_low_res(official, x)
        got = ours(x)["mask_logits"]
    official.float()
    assert got.dtype == torch.float64 and got.shape == expected.shape == (2, 1, SIZE // 4, SIZE // 4)
    # FpnNeck upsamples in float32 on both sides (the same operation), everything else is float64
    assert (got - expected).abs().max() <= 1e-10 * expected.abs().max()


def test_matches_sam2_image_predictor_in_float32(tiny_pair):
    """The whole public path: SAM2ImagePredictor.set_image (its own transforms) and predict() with no prompt,
    against samfit's normalisation and forward, at float32 rounding."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    official, path = tiny_pair
    ours = samfit.build_model("sam2_tiny", image_size=SIZE, checkpoint=path).eval()
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    predictor = SAM2ImagePredictor(official)
    predictor._bb_feat_sizes = [(SIZE // 4,) * 2, (SIZE // 8,) * 2, (SIZE // 16,) * 2]  # written for 1024 px
    with torch.no_grad():
        predictor.set_image(image)
        masks, _, _ = predictor.predict(multimask_output=False, return_logits=True, normalize_coords=False)
        x = torch.from_numpy(normalisation("sam2_tiny")(image.astype(np.float32)).transpose(2, 0, 1).copy())[None]
        got = ours(x)["logits"][0].numpy()
    scale = np.abs(masks).max()
    assert got.shape == masks.shape and np.abs(got - masks).max() <= 2 ** 12 * np.finfo(np.float32).eps * scale


def test_wrong_checkpoints_are_clear_errors(tiny_pair, tmp_path):
    _, path = tiny_pair
    with pytest.raises(SamfitError, match=rf"{path}.*is for sam2_tiny, but --model is sam2_hiera_t"):
        samfit.build_model("sam2_hiera_t", image_size=SIZE, checkpoint=path)
    sam1 = tmp_path / "sam_tiny.pth"
    torch.save(samfit.build_model("tiny", image_size=SIZE).state_dict(), sam1)
    with pytest.raises(SamfitError, match=rf"{sam1} is a SAM \(v1\) state dict"):
        samfit.build_model("sam2_tiny", image_size=SIZE, checkpoint=sam1)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SamfitError, match=rf"Could not read checkpoint {junk}"):
        samfit.build_model("sam2_tiny", image_size=SIZE, checkpoint=junk)
    with pytest.raises(SamfitError, match="(?s)sam2_hiera_t weights not found.*samfit weights download sam2_hiera_t"):
        resolve_checkpoint("sam2_hiera_t", None)


@pytest.mark.parametrize("size", [48, 100])
def test_image_size_must_fit_hiera(size):
    with pytest.raises(SamfitError, match=rf"--image-size {size} .*multiple of 32"):
        samfit.build_model("sam2_tiny", image_size=size)


def test_official_hiera_t_layout_loads_and_matches(tmp_path):
    official = official_sam2([], size=128)
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": official.state_dict()}, path)
    ours = samfit.build_model("sam2_hiera_t", image_size=128, checkpoint=path).double().eval()
    one_mask_token(official)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        expected = reference_low_res(official.double(), x)
        got = ours(x)["mask_logits"]
    assert (got - expected).abs().max() <= 1e-10 * expected.abs().max()


def test_grad_checkpoint_covers_hiera_blocks_with_the_same_gradients():
    from samfit.model.checkpointing import is_checkpointed, set_grad_checkpoint

    def grads(checkpointed):
        torch.manual_seed(0)
        model = samfit.get_method("lora").apply(samfit.build_model("sam2_tiny", image_size=SIZE)).double().train()
        set_grad_checkpoint(model, checkpointed)
        assert all(is_checkpointed(b) == checkpointed for b in model.image_encoder.blocks)
        x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        model(x)["logits"].square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and any("image_encoder" in n for n in plain)
    for n in plain:
        assert torch.allclose(plain[n], checkpointed[n], rtol=0, atol=1e-12 * plain[n].abs().max()), n


@pytest.mark.parametrize("name", [n for n in samfit.list_methods() if type(samfit.get_method(n)).mergeable
                                  and not missing_features(type(samfit.get_method(n)), "sam2_tiny")])
def test_mergeable_methods_merge_on_hiera(name):
    """Trained-looking parts (random, non-zero) folded into Hiera's own weights: the same outputs in float64 and
    only sam2's / torch's / segment_anything's modules left in the encoder."""
    torch.manual_seed(0)
    method = samfit.get_method(name)
    model = method.apply(samfit.build_model("sam2_tiny", image_size=SIZE)).double().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not n.startswith("mask_decoder."):
                p.add_(torch.randn(p.shape, dtype=p.dtype) * 0.05)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        before = model(x)["logits"]
        after = method.merge(model)(x)["logits"]
    assert (after - before).abs().max() <= 1e-10 * before.abs().max()
    kinds = {type(m).__module__.split(".")[0] for m in model.image_encoder.modules()}
    assert kinds <= {"sam2", "torch", "segment_anything", "samfit"}, kinds
    assert not any(type(m).__module__.startswith("samfit.methods") for m in model.image_encoder.modules())


def test_multiclass_queries_from_the_official_tokens(tiny_pair):
    """As for SAM: samfit's head cycles SAM 2's four mask tokens over the Q = 2C queries (plus 0.02 noise), the
    official head starts every query as token 0; MLP 0 is the shared hypernetwork."""
    _, path = tiny_pair
    official = torch.load(path, weights_only=True)["model"]
    tokens = official["sam_mask_decoder.mask_tokens.weight"]
    ours = samfit.build_model("sam2_tiny", num_classes=3, image_size=SIZE, checkpoint=path)
    got = ours.mask_decoder.mask_tokens.weight
    assert got.shape == (6, 256)
    assert (got - tokens[torch.arange(6) % 4]).abs().max() < 0.2 and not torch.equal(got, tokens[torch.arange(6) % 4])
    same = samfit.build_model("sam2_tiny", num_classes=3, image_size=SIZE, checkpoint=path, head="official")
    assert torch.equal(same.mask_decoder.mask_tokens.weight, tokens[[0] * 6])
    mlp = "output_hypernetworks_mlps.0.layers.0.weight"
    assert torch.equal(ours.mask_decoder.state_dict()[mlp], official["sam_mask_decoder." + mlp])


def test_a_sam2_file_given_to_sam_says_so(tiny_pair):
    _, path = tiny_pair
    with pytest.raises(SamfitError, match=rf"{path} is not a SAM state dict.*It is a SAM 2 checkpoint: pass --model"):
        samfit.build_model("tiny", image_size=SIZE, checkpoint=path)


@pytest.mark.slow  # a whole (tiny) run: ~10 s
def test_a_sam2_run_and_its_reload(tmp_path, data_root):
    """samfit run on sam2_tiny end to end (the engine names no backbone): counts, no SAM file, no embedding cache
    (LoRA trains the encoder from block 0 on, so there is no prefix to cache), per-image scores written, and
    load_run rebuilds a SAM 2 segmenter."""
    import csv
    import json

    from samfit.config import make_config
    from samfit.engine.train import run

    folder = run(make_config(method="lora", dataset="shapes", model="sam2_tiny", image_size=64, epochs=1,
                             limit_train=4, limit_eval=2, out=str(tmp_path / "runs"), data_root=str(data_root),
                             device="cpu"), quiet=True)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["model"] == "sam2_tiny" and metrics["params"]["trainable"] == 3_530_464 + 3_312  # LoRA's
    assert metrics["params"]["sam_total"] == 4_580_417 and metrics["sam_checkpoint"] is None
    assert metrics["embedding_cache"]["enabled"] is False
    model = samfit.load_run(folder)
    assert type(model).__name__ == "SAM2Segmenter" and model.image_size == 64
    rows = [r for r in csv.DictReader((folder / "per_image.csv").open())]
    assert len(rows) == 2 and all(0 <= float(r["iou_per_image"]) <= 1 for r in rows)
