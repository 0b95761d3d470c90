"""The decoder as an axis (`--decoder full|frozen|lora:R`): how much of the cut mask decoder trains.

* `full` (the paper's, the default): every parameter of the cut decoder trains (two-way transformer, output
  upscaling, IoU and mask tokens, hypernetwork MLP; the class head of the multi-class head).
* `frozen`: SAM's decoder weights stay as they are; only the method's encoder-side parts train. A method with
  no encoder-side parts (decoder-only) then trains nothing, which is an error.
* `lora:R`: LoRA (Hu et al. 2021) of rank R on the q/k/v/out projections of every attention of the decoder's
  two-way transformer, the rest of SAM's decoder frozen:

      y = W x + b + (α / R) · B A x,   A ∈ R^{R×d_in} (kaiming-uniform), B ∈ R^{d_out×R} (zero)

  with α the encoder LoRA's default (32), so the decoder equals SAM's at step 0. The attentions are found by
  what they are (a module whose class name ends in "Attention" and which has Linear `q_proj`, `k_proj`,
  `v_proj`, `out_proj`), not by path, so any decoder built from such attentions (SAM 2's too) works.

What else trains with `frozen` and `lora:R`, and why:
* parts SAM does not have, which start random and mean nothing frozen: the multi-class head's class head;
* with `lora:R` also the output tokens (the IoU token and the mask tokens, 256·(1 + Q) values): without a
  prompt they are the decoder's only queries, and SAM learnt them to be read together with prompt tokens that
  a prompt-free segmenter never gives. They are the decoder's counterpart of a learned prompt, under 1% of the
  LoRA factors (512 of 47,616 at R=4). The hypernetwork MLP and the output upscaling stay SAM's, as LoRA
  keeps the layers it does not adapt.

Decoder-side parameters with `lora:R` on SAM's decoder (depth 2, width 256, cross-attention at 128): each
LoRA on Linear(i, o) has R·(i + o); self-attention 4·512·R, each of the 5 cross-attentions 4·384·R, so
2·2048·R + 5·1536·R = 11,776·R, plus 256·(1 + Q) tokens (and the class head when multi-class).
"""
from __future__ import annotations

import re

from torch import nn

from samfit.errors import SamfitError
from samfit.methods.lora import LoRAConfig, LoRALinear

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
DECODER_FORMS = "full, frozen or lora:R (R an integer >= 1, e.g. lora:4)"


class DecoderLoRALinear(LoRALinear):
    """LoRALinear on a projection of a decoder attention (its own type, so the encoder's merge finds it too)."""


def parse_decoder(value) -> tuple[str, int | None]:
    """("full" | "frozen" | "lora", rank or None) of a `--decoder` value; a clear error otherwise."""
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in ("full", "frozen"):
        return text, None
    match = re.fullmatch(r"lora:(.*)", text or "")
    if match:
        rank = match[1].strip()
        if rank.isdigit() and int(rank) >= 1:
            return "lora", int(rank)
        raise SamfitError(f"--decoder {value}: the LoRA rank must be an integer >= 1 (e.g. lora:4), got "
                          f"{rank!r}.")
    raise SamfitError(f"--decoder {value!r}: choose {DECODER_FORMS}.")


def nothing_would_train(decoder: str, method: str) -> SamfitError:
    """The error for a frozen decoder beside a method with no encoder-side parts."""
    return SamfitError(f"--decoder {decoder} with method '{method}': nothing would train (the method has no "
                       f"encoder-side parts and the decoder is frozen). Use --decoder full or lora:R, or a "
                       f"method with encoder-side parts (see `samfit methods`).")


def normalise_decoder(value) -> str:
    kind, rank = parse_decoder(value)
    return kind if rank is None else f"lora:{rank}"


def decoder_attentions(decoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every attention in `decoder` with Linear q/k/v/out projections."""
    found = []
    for name, module in decoder.named_modules():
        if type(module).__name__.endswith("Attention") and all(
                isinstance(getattr(module, p, None), nn.Linear) for p in PROJECTIONS):
            found.append((name, module))
    return found


def _new_parts(decoder: nn.Module) -> list[nn.Module]:
    """Decoder parts that SAM has no weights for (random at the start): the multi-class class head."""
    return [decoder.class_head] if hasattr(decoder, "class_head") else []


def apply_decoder(model: nn.Module, value: str) -> nn.Module:
    """Set how much of `model.mask_decoder` trains (after the method is applied); returns the model."""
    kind, rank = parse_decoder(value)
    if kind == "full":
        return model
    decoder = model.mask_decoder
    decoder.requires_grad_(False)
    if kind == "lora":
        attentions = decoder_attentions(decoder)
        if not attentions:
            raise SamfitError(f"--decoder {value}: the mask decoder ({type(decoder).__name__}) has no attention "
                              f"with Linear {'/'.join(PROJECTIONS)} projections to put LoRA on. Use --decoder full "
                              f"or frozen.")
        alpha = LoRAConfig().alpha
        for _, attention in attentions:
            for proj in PROJECTIONS:
                setattr(attention, proj, DecoderLoRALinear(getattr(attention, proj), rank, alpha))
        for tokens in (decoder.iou_token, decoder.mask_tokens):
            tokens.requires_grad_(True)
    for part in _new_parts(decoder):
        part.requires_grad_(True)
    outside = any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("mask_decoder."))
    if kind == "frozen" and not outside:
        raise nothing_would_train(value, getattr(model, "method_name", "this method"))
    return model

