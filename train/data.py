"""The run's data, built from the config, the method and DATA/train's manifest: the training loader
(images or clips), its recipe, the eval loaders of the kNN monitor / epoch-start passes, and the
`DataInfo` a method is built from. The trainer sees one interface whatever the modality."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.format.layout import load_manifest
from pipeline.loaders.loader import FORMAT_BACKENDS
from pipeline.views.recipes import run_recipe

from .config import Config, ConfigError, data_kind
from .methods.base import DataInfo


@dataclass
class RunData:
    cfg: Config
    loader: object
    recipe: object
    """The training recipe as built (RecipeSpec, or ClipSpec for clips)."""
    recipe_name: str
    eval_recipe: object
    info: DataInfo
    rank: int
    world: int
    device: str
    _eval: dict = field(default_factory=dict)

    @property
    def clips(self) -> bool:
        return self.info.clips

    def eval_loader(self, split: str):
        """The center-crop (or centred-clip) loader of `split`, sharded over ranks, remainder kept; at
        its first batch."""
        if split not in self._eval:
            self._eval[split] = _loader(self.cfg, split, self.eval_recipe, self.info.clips, self.rank, self.world,
                                        self.device, mode="eval")
        ld = self._eval[split]
        ld.set_epoch(0)
        return ld

    def has_split(self, split: str) -> bool:
        return (Path(self.cfg.data.data) / split).is_dir()

    def export_meta(self) -> dict[str, str]:
        """What linear_eval needs to rebuild the eval input of an exported backbone."""
        d = self.cfg.data
        meta = {"recipe": self.recipe_name, "image_size": str(d.eval_image_size or d.image_size)}
        if self.info.clips:
            meta.update(frames=str(d.frames), stride=str(d.stride))
        return meta

    def close(self) -> None:
        for ld in [self.loader, *self._eval.values()]:
            ld.close()


def _loader(cfg: Config, split: str, recipe, clips: bool, rank: int, world: int, device: str, mode: str,
            return_aug: bool = False):
    d = cfg.data
    size = d.image_size if mode == "train" else (d.eval_image_size or d.image_size)
    common = dict(batch_size=d.batch_size, image_size=size, rank=rank, world_size=world, seed=cfg.run.seed,
                  device=device, mode=mode, return_aug=return_aug)
    if clips:  # B x C x T x H x W clips from a video split: pipeline/loaders/clips.py
        from pipeline.loaders.clips import build_clip_loader
        return build_clip_loader(d.data, split, recipe, frames=d.frames, stride=d.stride, decoder=d.decoder,
                                 **({"blur": d.blur} if mode == "train" else {}), **common)
    from pipeline import build_loader
    return build_loader(d.data, split, recipe, FORMAT_BACKENDS[d.format], **common)


def build_data(cfg: Config, method_cls, rank: int = 0, world: int = 1, device: str = "cpu") -> RunData:
    d = cfg.data
    if not d.data:
        raise ConfigError("--data is required (the converter's --out, holding train/)")
    clips = bool(method_cls.clips) or data_kind(d.data) == "video"
    name = d.recipe or method_cls.recipe
    try:
        if clips:
            from pipeline.loaders.clips import get_clip_recipe
            spec = get_clip_recipe(name, d.image_size, d.frames, d.stride, d.blur, d.crop_min_scale)
        else:
            spec = run_recipe(name, d.image_size, blur=d.blur, crop_min_scale=d.crop_min_scale)
    except ValueError as e:  # a recipe option the recipe cannot take (--crop-min-scale above its range)
        raise ConfigError(str(e)) from None
    loader = _loader(cfg, "train", spec, clips, rank, world, device, mode="train", return_aug=method_cls.wants_aug or cfg.model.aux != "none")
    spec = getattr(loader, "recipe", spec)
    manifest = load_manifest(Path(d.data) / "train")
    info = DataInfo(num_samples=loader.sampler.num_samples,
                    view_channels=tuple(v.num_channels for v in spec.views),
                    num_classes=int(manifest.get("num_classes", 0)), clips=clips)
    eval_recipe = method_cls.eval_recipe(name, d.eval_image_size or d.image_size)
    return RunData(cfg, loader, spec, name, eval_recipe, info, rank, world, device)
