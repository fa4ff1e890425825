"""InfoMin (Tian et al. 2020): MoCo v2 trained on the InfoMin augmentation (RandAugment on top of
MoCo v2's views), with the symmetric loss and temperature 0.15 of the paper's PyContrast recipe."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import temperature_key
from .mocov2 import MoCoV2, MoCoV2Config


@dataclass(kw_only=True)
class InfoMinConfig(MoCoV2Config):
    temperature: float = temperature_key(0.15)


class InfoMin(MoCoV2):
    name = "infomin"
    recipe = "infomin"
    Config = InfoMinConfig
    symmetric = True
