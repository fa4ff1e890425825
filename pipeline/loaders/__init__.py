"""Batches of views from a converted split (`batch`: the typed Batch every loader yields): the exact epoch order and rank partition (`sampler`), the
loader with its resumable state (`loader`: build_loader), the decode backends (`dali`, `ffcv`) with
their producer threads (`prefetch`), and clips from video splits (`clips`: build_clip_loader, with
`video_decode`)."""
