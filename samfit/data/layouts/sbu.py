"""SBU Shadow (Vicente et al., ECCV 2016): SBUTrain4KRecoveredSmall -> train and SBU-Test -> test, each with
ShadowImages/ and ShadowMasks/."""
from __future__ import annotations

from samfit.data.layouts.common import DirIndex, Layout, Splits, child, has, layout_error, pair_folder
from samfit.data.layouts.masks import decode_binary_mask

NAME = "sbu"
TREE = """
SBUTrain4KRecoveredSmall/{ShadowImages,ShadowMasks}/
SBU-Test/{ShadowImages,ShadowMasks}/"""
SBU_PARTS = (("ShadowImages",), ("ShadowMasks",))


def find_sbu(index: DirIndex) -> Splits | None:
    train = index.named("SBUTrain4KRecoveredSmall", having=has(*SBU_PARTS))
    test = index.named("SBU-Test", having=has(*SBU_PARTS))
    if train is None and test is None:
        return None
    if train is None or test is None:
        raise layout_error(NAME, TREE, f"Found {train or test} but not "
                                       f"{'SBUTrain4KRecoveredSmall' if train is None else 'SBU-Test'}.")
    return {split: pair_folder(child(d, "ShadowImages"), child(d, "ShadowMasks"))
            for split, d in (("train", train), ("test", test))}


LAYOUT = Layout(NAME, TREE, find_sbu, decode_binary_mask)
