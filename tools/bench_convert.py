#!/usr/bin/env python
"""Converter benchmark: `python tools/bench_convert.py --help` (the same as `python -m pipeline.bench.convert`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.bench.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
