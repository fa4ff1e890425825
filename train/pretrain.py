"""Self-supervised pretraining.

    accelerate launch train/pretrain.py --method simclr --data OUT --arch resnet18 --epochs 100 \\
        --batch-size 256 --image-size 224 --out runs/simclr --seed 0 [--resume] [--ckpt-every 1000] \\
        [--config run.yaml]
    accelerate launch --multi_gpu --num_processes 2 train/pretrain.py ...   # 2 gloo processes on CPU

--data is the converter's --out (train/ and optionally val/); --batch-size is per process. Every flag
is also a config-file key (run.yaml: `batch_size: 256`). Writes RUN_DIR/{config.json, metrics.jsonl,
report.png, checkpoints/, backbone.safetensors}.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch train/pretrain.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.methods import parse_config  # noqa: E402
from train.trainer import Trainer  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv, description=__doc__)
    trainer = Trainer(cfg)
    try:
        history = trainer.train()
    finally:
        trainer.close()
    return history


if __name__ == "__main__":
    main()
