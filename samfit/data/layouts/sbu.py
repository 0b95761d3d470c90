"""SBU Shadow (Vicente et al., ECCV 2016): SBUTrain4KRecoveredSmall -> train and SBU-Test -> test, each with
ShadowImages/ and ShadowMasks/. The test folder may also be called SBU-Test_rename (its name in many shadow
detection repositories) or SBUTest."""
from __future__ import annotations

from samfit.data.layouts.common import DirIndex, Layout, Splits, child, has, layout_error, pair_folder
from samfit.data.layouts.masks import decode_binary_mask

NAME = "sbu"
TREE = """
SBUTrain4KRecoveredSmall/{ShadowImages,ShadowMasks}/
SBU-Test/{ShadowImages,ShadowMasks}/              (or SBU-Test_rename/, SBUTest/)"""
SBU_PARTS = (("ShadowImages",), ("ShadowMasks",))
TRAIN_NAMES = ("SBUTrain4KRecoveredSmall", "SBUTrain4K", "SBU-Train")
TEST_NAMES = ("SBU-Test", "SBU-Test_rename", "SBUTest", "SBU_Test")


def find_sbu(index: DirIndex) -> Splits | None:
    train = index.named(*TRAIN_NAMES, having=has(*SBU_PARTS))
    test = index.named(*TEST_NAMES, having=has(*SBU_PARTS))
    if train is None and test is None:
        return None
    if train is None or test is None:
        wanted = TRAIN_NAMES if train is None else TEST_NAMES
        raise layout_error(NAME, TREE, f"Found {train or test} but no {' / '.join(wanted)} folder with "
                                       f"ShadowImages/ and ShadowMasks/ (looked in {index.where()}); "
                                       f"{index.nearest(*wanted)}.")
    return {split: pair_folder(child(d, "ShadowImages"), child(d, "ShadowMasks"))
            for split, d in (("train", train), ("test", test))}


LAYOUT = Layout(NAME, TREE, find_sbu, decode_binary_mask)
