"""SAM-Adapter (EVP prompt generator): size, the high-frequency component against numpy, where prompts enter."""
import numpy as np
import pytest
import torch

import samfit
from samfit.errors import SamfitError
from samfit.methods.sam_adapter import SAMAdapterEncoder, high_frequency_component

DIMS = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: steadier and faster on a shared CPU
# high_frequency_component computes in float32 whatever the input dtype (sam_adapter.py), so its checks bound the
# error by 2**10 float32 eps (≈ 1.2e-4) of the input's largest value: a forward and an inverse FFT of up to
# 64x64 points round by a few eps per stage (measured at most 22 eps, on the cosine inputs), while a mask one
# frequency line off moves the output by ~1e-1 of that scale (random input) or ~1 (the cosines).
HFC_ATOL = 2**10 * torch.finfo(torch.float32).eps
# The encoder checks run in float64, to 2**20 eps (≈ 2.3e-10) of the scale of what is compared.
RTOL64 = 2**20 * torch.finfo(torch.float64).eps


def _numpy_high_frequency(x: np.ndarray, ratio: float) -> np.ndarray:
    """Independent reference: centred spectrum, zero the central square of side 2·floor(sqrt(HW·ratio)/2)."""
    h, w = x.shape[-2:]
    half = int(np.floor(np.sqrt(h * w * ratio) / 2))
    spectrum = np.fft.fftshift(np.fft.fft2(x, norm="forward"), axes=(-2, -1))
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    low = (np.abs(rows - h // 2 + 0.5) < half) & (np.abs(cols - w // 2 + 0.5) < half)
    spectrum = np.where(low, 0, spectrum)
    return np.abs(np.fft.ifft2(np.fft.ifftshift(spectrum, axes=(-2, -1)), norm="forward").real)


@pytest.mark.parametrize("variant", list(DIMS))
def test_default_count_within_budget(variant):
    d, L = DIMS[variant]
    c, patch = d // 16, 16
    with torch.device("meta"):
        model = samfit.get_method("sam-adapter").apply(samfit.build_model(variant, image_size=256))
    enc = samfit.count_parameters(model)["encoder_trainable"]
    assert enc == L * (c * c + c) + (d * c + c) + (c * d + d) + (3 * patch * patch * c + c)
    assert enc == {"vit_b": 139_680, "vit_l": 281_216, "vit_h": 475_040}[variant]
    assert 0.65 <= enc / (12 * d * L) <= 1.35


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 32, 48), (1, 1, 17, 17)])
@pytest.mark.parametrize("ratio", [0.25, 0.1])
def test_high_frequency_component_matches_numpy(shape, ratio):
    x = np.random.default_rng(0).normal(size=shape)
    ours = high_frequency_component(torch.from_numpy(x), ratio).numpy()
    np.testing.assert_allclose(ours, _numpy_high_frequency(x, ratio), rtol=0, atol=HFC_ATOL * np.abs(x).max())


def test_high_frequency_component_removes_smooth_content_and_keeps_edges():
    n = 64
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    smooth = 3.0 + torch.cos(2 * torch.pi * 2 * xx / n)  # DC + frequency 2: inside the masked square
    checker = ((yy + xx) % 2).float() * 2 - 1  # Nyquist frequency: outside it
    image = torch.stack([smooth, checker, smooth + checker])[None]
    hfc = high_frequency_component(image, 0.25)
    atol = HFC_ATOL * image.abs().max().item()  # the cosines below have largest value 1
    assert hfc[0, 0].abs().max() < atol
    torch.testing.assert_close(hfc[0, 1], checker.abs(), atol=atol, rtol=0)
    torch.testing.assert_close(hfc[0, 2], checker.abs(), atol=atol, rtol=0)
    # the highest frequency the mask removes along an axis at mask_ratio 0.25 on 64 px is 64/4 - 1 = 15
    inside = torch.cos(2 * torch.pi * 15 * xx / n)[None, None]
    outside = torch.cos(2 * torch.pi * 17 * xx / n)[None, None]
    assert high_frequency_component(inside, 0.25).abs().max() < HFC_ATOL
    torch.testing.assert_close(high_frequency_component(outside, 0.25), outside.abs(), atol=HFC_ATOL, rtol=0)


def test_prompts_are_added_to_the_tokens_before_every_block():
    torch.manual_seed(0)
    model = samfit.get_method("sam-adapter").apply(samfit.build_model("tiny")).eval().double()
    encoder = model.image_encoder
    assert isinstance(encoder, SAMAdapterEncoder)
    sam, generator = encoder.backbone, encoder.prompt_generator
    inputs, outputs = [], []
    for block in sam.blocks:
        block.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
        block.register_forward_hook(lambda m, args, out: outputs.append(out))
    images = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    with torch.no_grad():
        encoder(images)
        tokens = sam.patch_embed(images)
        hfc = high_frequency_component(images, 0.25).to(images.dtype)  # computed in float32, as the encoder does
        features = generator.handcrafted_embed(hfc).permute(0, 2, 3, 1) + generator.embedding_generator(tokens)
        previous = [tokens + sam.pos_embed] + outputs[:-1]
        for i, (x_in, x_prev) in enumerate(zip(inputs, previous)):
            prompt = generator.shared_mlp(torch.nn.functional.gelu(generator.lightweight_mlps[i][0](features)))
            assert prompt.abs().max() > 0
            # x_in - x_prev cancels: its rounding follows the size of the tokens, not of the prompt
            torch.testing.assert_close(x_in - x_prev, prompt, rtol=0, atol=RTOL64 * x_in.abs().max().item())


def test_zero_shared_mlp_gives_plain_sam():
    torch.manual_seed(0)
    base = samfit.build_model("tiny").eval()
    model = samfit.get_method("sam-adapter").apply(samfit.build_model("tiny")).eval()
    model.load_state_dict(base.state_dict(), strict=False)
    model.image_encoder.backbone.load_state_dict(base.image_encoder.state_dict())
    for m in (base, model):  # float64, but for the prompt encoder's position table (SAM builds it in float32)
        m.double().prompt_encoder.pe_layer.float()
    images = torch.randn(1, 3, 128, 128, dtype=torch.float64)
    with torch.no_grad():
        expected = base(images)["logits"]
        assert not torch.allclose(model(images)["logits"], expected)
        model.image_encoder.prompt_generator.shared_mlp.weight.zero_()
        model.image_encoder.prompt_generator.shared_mlp.bias.zero_()
        torch.testing.assert_close(model(images)["logits"], expected, rtol=0,
                                   atol=RTOL64 * expected.abs().max().item())


def test_vit_b_forward_at_256():
    torch.manual_seed(0)
    model = samfit.get_method("sam-adapter").apply(samfit.build_model("vit_b", image_size=256)).eval()
    with torch.no_grad():
        embedding = model.image_encoder(torch.randn(1, 3, 256, 256))
    assert embedding.shape == (1, 256, 16, 16) and torch.isfinite(embedding).all()


def test_invalid_settings_are_explained():
    with pytest.raises(SamfitError, match="scale_factor"):
        samfit.get_method("sam-adapter", scale_factor=0)
    with pytest.raises(SamfitError, match="mask_ratio"):
        samfit.get_method("sam-adapter", mask_ratio=1.5)
    with pytest.raises(SamfitError, match="divide"):
        samfit.get_method("sam-adapter", scale_factor=7).apply(samfit.build_model("tiny"))
