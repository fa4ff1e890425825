"""Procedural datasets for demos, tests and benchmarks (no downloads): ImageNet-layout images
(`images`, with the converter's bad-input zoo) and UCF101 / Kinetics-layout videos (`video`)."""
