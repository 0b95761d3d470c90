"""MedSAM's own box-prompted inference, for `samfit evaluate --prompts box` on medsam_vit_b runs.

MedSAM (Ma et al., Nature Communications 2024) is prompted through MedSAM_Inference.py's path (bowang-lab/MedSAM,
`medsam_inference` and the script around it), not SamPredictor's, since that is how it was trained and is used:

* the RGB image resized to 1024×1024, ignoring its aspect ratio and with no padding (scikit-image's
  `transform.resize`, order-3 spline, anti-aliased, range preserved, then cast to uint8, as the script does);
* min-max scaled to [0, 1] over the whole image (MEDSAM_NORMALISATION: no mean/std), then the image encoder;
* each XYXY box scaled to 1024 coordinates (x·1024/W, y·1024/H), the prompt encoder given boxes only, the mask
  decoder asked for one mask per box (multimask_output=False);
* sigmoid of the 256×256 low-res logits, upsampled bilinearly (align_corners=False) straight to the image's H×W,
  foreground where > 0.5.

SamPredictor instead resizes the longest side to 1024 and pads, normalises with SAM's mean/std, upsamples logits to
1024, crops the padding, resizes again and thresholds the logits at 0: a different function of the image.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from samfit.errors import SamfitError
from samfit.model.backbones import MEDSAM_NORMALISATION

PIPELINE = "MedSAM_Inference"
MEDSAM_SIZE = 1024  # MedSAM's input side: the prompt encoder's box coordinates and 64×64 embedding assume it
THRESHOLD = 0.5  # on the sigmoid, after upsampling (not on the logits)


def medsam_input(image: np.ndarray) -> torch.Tensor:
    """(1, 3, 1024, 1024) float32 encoder input of an RGB uint8 image (H, W, 3), as MedSAM_Inference.py makes it."""
    from skimage import transform

    if image.ndim != 3 or image.shape[2] != 3:
        raise SamfitError(f"MedSAM's box prompts need an RGB image (H, W, 3), got an array of shape {image.shape}. "
                          f"Read images with samfit.data.folder.read_image (always RGB).")
    resized = transform.resize(image, (MEDSAM_SIZE, MEDSAM_SIZE), order=3, preserve_range=True,
                               anti_aliasing=True).astype(np.uint8)  # a truncating cast, as in the script
    scaled = MEDSAM_NORMALISATION(resized.astype(np.float32))
    return torch.from_numpy(np.ascontiguousarray(scaled)).permute(2, 0, 1)[None]


def boxes_1024(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """XYXY pixel boxes of an H×W image in MedSAM's 1024×1024 input coordinates."""
    h, w = size
    return np.asarray(boxes, np.float64) / np.array([w, h, w, h]) * MEDSAM_SIZE


class MedSAMPredictor:
    """MedSAM's inference on a segment_anything Sam (image_encoder, prompt_encoder, mask_decoder): `set_image`
    encodes an image once; `low_res_logits`, `probabilities` and `box_masks` prompt it with boxes."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.features, self.original_size = None, None

    @torch.no_grad()
    def set_image(self, image: np.ndarray, prepared: torch.Tensor | None = None) -> None:
        """Encode an RGB uint8 image (H, W, 3); `prepared`: its medsam_input, when already made (the resize costs
        about a second at 1024 px, so two models on one image make it once)."""
        prepared = medsam_input(image) if prepared is None else prepared
        self.features = self.model.image_encoder(prepared.to(self.device))
        self.original_size = tuple(image.shape[:2])

    def share_image(self, target: "MedSAMPredictor") -> None:
        """Give `target` (a model with the same encoder) this image embedding: no second encoder pass."""
        target.features, target.original_size = self.features, self.original_size

    @torch.no_grad()
    def low_res_logits(self, boxes: np.ndarray) -> torch.Tensor:
        """(N, 1, 256, 256) mask logits for N XYXY boxes in the image's pixels."""
        if self.features is None:
            raise RuntimeError("MedSAMPredictor: call set_image first")
        box = torch.as_tensor(boxes_1024(boxes, self.original_size), dtype=torch.float, device=self.device)
        prompt = self.model.prompt_encoder
        sparse, dense = prompt(points=None, boxes=box[:, None, :], masks=None)
        logits, _ = self.model.mask_decoder(image_embeddings=self.features, image_pe=prompt.get_dense_pe(),
                                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                            multimask_output=False)
        return logits

    @torch.no_grad()
    def probabilities(self, boxes: np.ndarray) -> torch.Tensor:
        """(N, H, W) foreground probabilities at the image's size: sigmoid, then bilinear upsampling."""
        probs = torch.sigmoid(self.low_res_logits(boxes))
        return F.interpolate(probs, size=self.original_size, mode="bilinear", align_corners=False)[:, 0]

    def box_masks(self, boxes: np.ndarray) -> np.ndarray:
        """The union of the boxes' masks (H, W), bool."""
        return (self.probabilities(boxes) > THRESHOLD).any(dim=0).cpu().numpy()
