"""How views are made: a recipe is a typed spec (`spec`, `recipes`, with the transforms runs apply to
it), every view's random parameters are a pure function of (seed, epoch, index, view) (`params`), and
two executors apply them (`torch_ops`: batched torch, the reference and the GPU path; `cpu_views`: per
image on the CPU, uint8 until the last op). The loaders compile a recipe to their backend."""
