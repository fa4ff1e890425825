"""The on-disk format of a converted split, shared by the converters (writers) and the loaders (readers):
file layout and manifest (`layout`), the shards' DALI indexes (`shard_index`), the JPEG check (`jpeg`)."""
