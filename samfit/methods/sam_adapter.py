"""SAM-Adapter (Chen et al. 2023, "SAM Fails to Segment Anything? -- SAM-Adapter", arXiv 2304.09148; code
tianrun-chen/SAM-Adapter-PyTorch), whose adapter is the prompt generator of Explicit Visual Prompting
(Liu et al., CVPR 2023).

With c = d / scale_factor, patch size P and the frozen SAM encoder's patch embedding x_0 = PatchEmbed(I):

    F_hfc = Conv_{P×P, stride P}(|IFFT(HighPass(FFT(I)))|)      handcrafted feature, 3 → c
    F_pe  = embedding_generator(x_0)                            Linear(d, c), before the position embedding
    p_i   = shared_mlp(GELU(lightweight_mlp_i(F_hfc + F_pe)))   Linear(c, c) per block, Linear(c, d) shared
    x_{i+1} = Block_i(x_i + p_i)

HighPass zeroes the centred (fftshift-ed) square of side 2·floor(sqrt(H·W·mask_ratio)/2) — the lowest
frequencies, a quarter of the spectrum at mask_ratio 0.25 — as the reference's `PromptGenerator.fft`
(forward-normalised FFT pair, real part, absolute value). The encoder receives SAM's normalised image, so
the FFT is taken of the normalised image, as in the reference, whose input is normalised with the same
ImageNet mean/std. (A per-channel affine normalisation only rescales the component: it shifts the DC term,
which the mask removes.)
Initialisation as the reference: Linear weights truncated-normal(std 0.02), biases 0; the conv
normal(0, sqrt(2 / (P·P·c))). The prompts are non-zero at step 0, so the model is not SAM at init.

Size: L·(c² + c) + (d·c + c) + (c·d + d) + (3·P²·c + c). The reference's scale_factor 32 gives 57%, 40% and
38% of LoRA r=3's 12·d·L on vit_b/l/h (outside the ±35% budget); the default 16 (c = 48/64/80) gives
139,680 / 281,216 / 475,040 = 126.3% / 95.4% / 96.6%.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from samfit.errors import SamfitError
from samfit.methods.base import Method, register_method, require_float, require_int


def high_frequency_component(images: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """|IFFT(FFT(x) with the centred low-frequency square zeroed)| per channel, in float32 (float64 for float64
    images)."""
    h, w = images.shape[-2:]
    line = int(math.sqrt(h * w * mask_ratio) // 2)
    keep = torch.ones(h, w, device=images.device)
    keep[h // 2 - line:h // 2 + line, w // 2 - line:w // 2 + line] = 0
    images = images.to(torch.promote_types(images.dtype, torch.float32))  # 16-bit up to float32; float64 kept
    spectrum = torch.fft.fftshift(torch.fft.fft2(images, norm="forward"), dim=(-2, -1))
    spectrum = torch.fft.ifftshift(spectrum * keep, dim=(-2, -1))
    return torch.fft.ifft2(spectrum, norm="forward").real.abs()


class PromptGenerator(nn.Module):
    """EVP's prompt generator: handcrafted (high-frequency) + embedding features → one prompt per block."""

    def __init__(self, dim: int, depth: int, patch_size: int, scale_factor: int, mask_ratio: float):
        super().__init__()
        hidden = dim // scale_factor
        self.mask_ratio = mask_ratio
        self.shared_mlp = nn.Linear(hidden, dim)
        self.embedding_generator = nn.Linear(dim, hidden)
        self.lightweight_mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, hidden), nn.GELU()) for _ in range(depth))
        self.handcrafted_embed = nn.Conv2d(3, hidden, kernel_size=patch_size, stride=patch_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            nn.init.zeros_(m.bias)

    def features(self, images: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
        """F_hfc + F_pe as a (B, H/P, W/P, c) grid."""
        hfc = high_frequency_component(images, self.mask_ratio).to(images.dtype)
        handcrafted = self.handcrafted_embed(hfc).permute(0, 2, 3, 1)
        return handcrafted + self.embedding_generator(patch_tokens)

    def prompt(self, i: int, features: torch.Tensor) -> torch.Tensor:
        return self.shared_mlp(self.lightweight_mlps[i](features))


class SAMAdapterEncoder(nn.Module):
    """SAM's frozen ImageEncoderViT with a prompt added to the tokens before every block."""

    def __init__(self, backbone: nn.Module, scale_factor: int, mask_ratio: float):
        super().__init__()
        self.backbone = backbone
        dim = backbone.patch_embed.proj.out_channels
        patch = backbone.patch_embed.proj.kernel_size[0]
        self.prompt_generator = PromptGenerator(dim, len(backbone.blocks), patch, scale_factor, mask_ratio)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        enc = self.backbone
        x = enc.patch_embed(images)
        features = self.prompt_generator.features(images, x)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        for i, block in enumerate(enc.blocks):
            x = block(x + self.prompt_generator.prompt(i, features))
        return enc.neck(x.permute(0, 3, 1, 2))


@dataclass
class SAMAdapterConfig:
    scale_factor: int = 16
    mask_ratio: float = 0.25

    def __post_init__(self):
        self.scale_factor = require_int("sam-adapter", "scale_factor", self.scale_factor, minimum=1,
                                        note=" dividing the encoder width (prompt width c = d / scale_factor)")
        self.mask_ratio = require_float("sam-adapter", "mask_ratio", self.mask_ratio, low=0, high=1,
                                        include_high=False)  # the low-frequency share of the spectrum removed


@register_method
class SAMAdapter(Method):
    name = "sam-adapter"
    requires = frozenset({"vit-stem"})
    summary = "high-frequency + patch-embedding prompts added before every block (EVP / SAM-Adapter)"
    Config = SAMAdapterConfig

    def inject(self, model) -> None:
        dim = model.image_encoder.patch_embed.proj.out_channels
        if dim % self.config.scale_factor:
            raise SamfitError(f"--method-arg scale_factor={self.config.scale_factor} for method 'sam-adapter' does "
                              f"not divide the encoder width {dim}; pick a divisor (e.g. 16).")
        model.image_encoder = SAMAdapterEncoder(model.image_encoder, self.config.scale_factor,
                                                self.config.mask_ratio)
