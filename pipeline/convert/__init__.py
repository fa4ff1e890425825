"""Conversion of image and video datasets into the converted-split format (pipeline/format): one engine
(`engine`), a modality per kind of data (`images`, `video`) with its codec (`image_codec`,
`video_codec`), and the writers (`tar_writer`: WebDataset shards + DALI index; `beton_writer`: ffcv;
`atomic`: files that appear only when complete)."""

from pipeline.convert.engine import PROGRESS, ConversionError, summary
from pipeline.convert.images import ConvertConfig, convert
from pipeline.convert.video import VideoConvertConfig, convert_video

__all__ = ["PROGRESS", "ConversionError", "summary", "ConvertConfig", "convert", "VideoConvertConfig",
           "convert_video"]
