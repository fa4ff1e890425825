"""InfoMin (Tian et al. 2020): MoCo v2 trained on the InfoMin augmentation (RandAugment on top of
MoCo v2's views), with the symmetric loss and temperature 0.15 of the paper's PyContrast recipe."""

from __future__ import annotations

from .mocov2 import MoCoV2


class InfoMin(MoCoV2):
    name = "infomin"
    recipe = "infomin"
    defaults = {**MoCoV2.defaults, "temperature": 0.15}
    symmetric = True
