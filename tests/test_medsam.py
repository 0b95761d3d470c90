"""MedSAM (medsam_vit_b): SAM ViT-B's architecture, MedSAM's file and preprocessing."""
import numpy as np
import pytest
import torch
from segment_anything import sam_model_registry

import samfit
from samfit import SamfitError
from samfit.data.folder import SegmentationFolder
from samfit.losses import structure_loss
from samfit.model.backbones import get_backbone, normalisation, resolve_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_medsam_is_vit_b_with_its_own_file_and_no_direct_url():
    b = get_backbone("medsam_vit_b")
    assert b.family == "sam" and b.architecture == "vit_b" and b.weights.file == "medsam_vit_b.pth"
    assert b.weights.url is None and "github.com/bowang-lab/MedSAM" in b.weights.source
    with pytest.raises(SamfitError, match="(?s)no stable direct URL for medsam_vit_b.pth.*--checkpoint PATH"):
        resolve_checkpoint("medsam_vit_b", None)


def test_normalisation_is_min_max_to_unit_range(tmp_path):
    """MedSAM_Inference.py: (x - min) / max(max - min, 1e-8) over the whole image; no mean/std."""
    import cv2

    rng = np.random.default_rng(0)
    image = rng.integers(30, 200, (20, 24, 3)).astype(np.float32)
    got = normalisation("medsam_vit_b")(image)
    assert np.allclose(got, (image - image.min()) / (image.max() - image.min()))
    assert got.min() == 0 and got.max() == 1
    flat = np.full((4, 4, 3), 77, np.float32)
    assert np.all(normalisation("medsam_vit_b")(flat) == 0)  # a constant image: 0, not a division by zero
    sam = normalisation("vit_b")(image)
    assert np.allclose(sam, (image - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375])
    for split in ("images", "masks"):
        (tmp_path / split).mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), image.astype(np.uint8))
    cv2.imwrite(str(tmp_path / "masks" / "a.png"), np.zeros((20, 24), np.uint8))
    pairs = [(tmp_path / "images" / "a.png", tmp_path / "masks" / "a.png")]
    x, _, _ = SegmentationFolder(pairs, 32, "binary", 1, model="medsam_vit_b")[0]
    assert x.shape == (3, 32, 32) and x.min() == 0 and x.max() == 1


@pytest.mark.slow  # a 375 MB file written and read: ~4 s
def test_official_layout_checkpoint_loads(tmp_path):
    """A random ViT-B Sam (segment_anything's own builder, 1024 px tables) saved as MedSAM's file loads at 256 px."""
    torch.manual_seed(0)
    official = sam_model_registry["vit_b"]().state_dict()
    path = tmp_path / "medsam_vit_b.pth"
    torch.save(official, path)
    model = samfit.build_model("medsam_vit_b", image_size=256, checkpoint=path)
    state = model.state_dict()
    key = "image_encoder.blocks.11.attn.qkv.weight"
    assert torch.equal(state[key], official[key])
    assert torch.equal(state["mask_decoder.mask_tokens.weight"], official["mask_decoder.mask_tokens.weight"][0:1])
    assert state["image_encoder.pos_embed"].shape == (1, 16, 16, 768)
    assert model.variant == "medsam_vit_b"


def test_medsam_architecture_is_vit_bs():
    """The same modules and shapes as vit_b, so test_methods.py's training of every method on vit_b (two steps at
    256 px) is training on MedSAM's architecture; the test below runs two of them under the MedSAM name."""
    with torch.device("meta"):
        medsam, vit_b = (samfit.build_model(n, image_size=256).state_dict() for n in ("medsam_vit_b", "vit_b"))
    assert {k: v.shape for k, v in medsam.items()} == {k: v.shape for k, v in vit_b.items()}


@pytest.mark.slow  # SAM ViT-B's 90M parameters: ~2 s per method
@pytest.mark.parametrize("name", ["lora", "sam-adapter"])  # sam-adapter reads the (here [0, 1]-scaled) image itself
def test_methods_train_on_medsam(name):
    torch.manual_seed(0)
    model = samfit.get_method(name).apply(samfit.build_model("medsam_vit_b", image_size=64)).train()
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
                 and not n.startswith("mask_decoder.")}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # MedSAM's input range
    y = (torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    out = model(x)
    loss = structure_loss(out["logits"], y) + out["aux_loss"]
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)
