"""tools/convert_imagenet.py: round trips through the stock readers, bad inputs, resume, determinism."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.format import layout as fmt
from pipeline.convert import PROGRESS, ConversionError, ConvertConfig, convert
from tools.inspect_dataset import inspect

ROOT = Path(__file__).resolve().parents[1]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != "contact_sheet.png"}


def _members(split_dir: Path, manifest: dict) -> dict[int, dict]:
    out = {}
    for sh in manifest["shards"]:
        with tarfile.open(split_dir / sh["tar"]) as tf:
            for m in tf:
                key, _, ext = m.name.partition(".")
                out.setdefault(int(key), {})[ext] = tf.extractfile(m).read()
    return out


def test_round_trip_all_readers(converted):
    split_dir, manifest, _ = converted
    rep = inspect(split_dir, decode=True, sheet=split_dir / "contact_sheet.png")
    assert rep["problems"] == []
    n = manifest["num_samples"]
    assert rep["read"] == {"tarfile": n, "webdataset": n, "dali": n, "ffcv": n}
    assert (split_dir / "contact_sheet.png").stat().st_size > 10_000


def test_every_good_sample_once_every_bad_one_reported(converted, synth_src):
    split_dir, manifest, zoo = converted
    src, _ = synth_src
    bad = [json.loads(line) for line in (split_dir / fmt.BAD_FILES).read_text().splitlines()]
    bad_paths = {b["path"] for b in bad}
    expect_bad = {f"train/{p}" for p, kind in zoo.items() if kind == "bad"}
    assert bad_paths == expect_bad
    assert all(b["reason"] for b in bad)
    sources = [json.loads(m["json"])["source"] for m in _members(split_dir, manifest).values()]
    assert len(sources) == len(set(sources)) == manifest["num_samples"]
    expect_good = {f"train/{p}" for p, kind in zoo.items() if kind == "converted"}
    expect_good |= {str(p.relative_to(src)) for p in (src / "train").glob("n900*/n900*.JPEG")}
    assert set(sources) == expect_good
    assert not any("notes.txt" in s or "sub folder" in s for s in sources)
    assert manifest["num_ignored"] == 2
    assert manifest["empty_classes"] == ["n99999999_empty"]
    assert manifest["classes"][-1] == "n99999999_empty" and manifest["class_counts"][-1] == 0


def test_members_are_consistent_baseline_rgb_jpegs(converted, synth_src):
    split_dir, manifest, _ = converted
    src, _ = synth_src
    from PIL import Image
    import io
    members = _members(split_dir, manifest)
    assert sorted(members) == list(range(manifest["num_samples"]))
    for idx, m in members.items():
        assert tuple(k for k in m) == fmt.MEMBER_EXTS
        meta = json.loads(m["json"])
        assert meta["index"] == idx == int(np.frombuffer(m["index.i64"], "<i8")[0])
        assert meta["label"] == int(m["cls"]) == int(np.frombuffer(m["label.i64"], "<i8")[0])
        assert manifest["classes"][meta["label"]] == meta["class"] == meta["source"].split("/")[1]
        im = Image.open(io.BytesIO(m["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB" and not im.info.get("progressive")
        assert im.size == (meta["width"], meta["height"])
        original = (src / meta["source"]).read_bytes()
        if meta["source"].endswith(("_0.JPEG", "_1.JPEG")):  # plain baseline JPEGs: kept byte for byte
            assert m["jpg"] == original


def _dali_decode_all(jpegs: list[bytes]) -> list[tuple[int, ...]]:
    """Decode every JPEG with DALI's CPU decoder (external source, one batch); returns the shapes."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(jpegs), num_threads=2, device_id=None, exec_dynamic=True)
    def pipe():
        enc = fn.external_source(source=lambda: [np.frombuffer(j, np.uint8) for j in jpegs], dtype=types.UINT8,
                                 batch=True)
        return fn.decoders.image(enc, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    (out,) = p.run()
    return [tuple(out.at(i).shape) for i in range(len(jpegs))]


def test_every_stored_sample_decodes_with_the_strict_stock_decoders(converted):
    """PIL, libjpeg-turbo with warnings as errors (simplejpeg strict), DALI's CPU decoder and the loaders'
    structural check all accept every stored JPEG, the damaged-scan members of the zoo included (they are
    in bad_files.jsonl instead)."""
    import io
    import simplejpeg
    from PIL import Image
    from pipeline.format.jpeg import jpeg_check
    split_dir, manifest, zoo = converted
    jpegs = [m["jpg"] for _, m in sorted(_members(split_dir, manifest).items())]
    for j in jpegs:
        with Image.open(io.BytesIO(j)) as im:
            im.load()
        simplejpeg.decode_jpeg(j, strict=True)
        assert jpeg_check(np.frombuffer(j, np.uint8))[0] == 0
    shapes = _dali_decode_all(jpegs)
    assert [s[:2] for s in shapes] == [(json.loads(m["json"])["height"], json.loads(m["json"])["width"])
                                       for _, m in sorted(_members(split_dir, manifest).items())]
    reasons = {json.loads(x)["path"]: json.loads(x)["reason"] for x in (split_dir / fmt.BAD_FILES).read_text().splitlines()}
    for name in ("corrupt_middle", "corrupt_middle_no_ff", "restart_out_of_order", "truncated_fake_eoi"):
        (path,) = [p for p in reasons if p.endswith(f"/{name}.JPEG")]
        assert reasons[path].startswith("corrupt or truncated JPEG"), (path, reasons[path])
    assert manifest["actions"].get("trimmed") == 1


def test_shards_are_class_mixed_and_ranges_in_manifest(converted):
    split_dir, manifest, _ = converted
    members = _members(split_dir, manifest)
    for sh in manifest["shards"]:
        rng = range(sh["first_index"], sh["first_index"] + sh["num_samples"])
        labels = {json.loads(members[i]["json"])["label"] for i in rng}
        assert len(labels) >= 3, "a shard should mix classes"
    assert sum(sh["num_samples"] for sh in manifest["shards"]) == manifest["num_samples"]


def test_dali_index_matches_wds2idx(converted, tmp_path):
    from wds2idx import IndexCreator
    split_dir, manifest, _ = converted
    for sh in manifest["shards"]:
        ref = tmp_path / "ref.idx"
        with IndexCreator(str(split_dir / sh["tar"]), str(ref), verbose=False) as ic:
            ic.create_index()
        assert ref.read_bytes() == (split_dir / sh["idx"]).read_bytes()


@pytest.mark.parametrize("workers", [1, 3])
def test_deterministic_across_runs_and_worker_counts(converted, synth_src, tmp_path, workers):
    split_dir, _, _ = converted
    src, _ = synth_src
    convert(ConvertConfig(src=str(src), out=str(tmp_path), split="train", shard_size=16, workers=workers,
                          progress=False))
    assert _files(tmp_path / "train") == _files(split_dir)


def test_seed_changes_order_not_content(converted, synth_src, tmp_path):
    split_dir, manifest, _ = converted
    src, _ = synth_src
    m2 = convert(ConvertConfig(src=str(src), out=str(tmp_path), split="train", shard_size=16, seed=7,
                               progress=False))
    a = {json.loads(m["json"])["source"]: i for i, m in _members(split_dir, manifest).items()}
    b = {json.loads(m["json"])["source"]: i for i, m in _members(tmp_path / "train", m2).items()}
    assert set(a) == set(b) and a != b


def test_same_out_different_arguments_refuses(converted, synth_src):
    split_dir, _, _ = converted
    src, _ = synth_src
    with pytest.raises(ConversionError, match="different arguments.*shard_size"):
        convert(ConvertConfig(src=str(src), out=str(split_dir.parent), split="train", shard_size=8, progress=False))
    # Rerunning the same command over a complete output is a no-op.
    before = _files(split_dir)
    convert(ConvertConfig(src=str(src), out=str(split_dir.parent), split="train", shard_size=16, progress=False))
    assert _files(split_dir) == before


def _cli(*args):
    return [sys.executable, str(ROOT / "tools" / "convert_imagenet.py"), "--no-progress", *args]


def test_kill_9_then_rerun_is_byte_identical(synth_src, tmp_path):
    src, _ = synth_src
    args = ["--src", str(src), "--split", "train", "--shard-size", "4", "--max-side", "96", "--workers", "1"]
    clean = tmp_path / "clean"
    subprocess.run(_cli(*args, "--out", str(clean)), check=True, capture_output=True)
    killed = tmp_path / "killed"
    kills = 0
    for wait_shards in (3, 9):  # kill twice, at different points of the run
        proc = subprocess.Popen(_cli(*args, "--out", str(killed)), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        progress = killed / "train" / PROGRESS
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            try:
                if len(json.loads(progress.read_text())["shards"]) >= wait_shards:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1, "conversion finished before it could be killed"
    assert not (killed / "train" / fmt.MANIFEST).exists()
    r = subprocess.run(_cli(*args, "--out", str(killed)), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _files(killed / "train") == _files(clean / "train")


def test_kill_during_beton_write_then_rerun(synth_src, tmp_path):
    """A crash after the shards but before the .beton: the rerun rebuilds the .beton only."""
    src, _ = synth_src
    cfg = dict(src=str(src), split="train", shard_size=16, progress=False)
    convert(ConvertConfig(out=str(tmp_path / "clean"), **cfg))
    import pipeline.convert.beton_writer as bw
    real = bw.write_beton

    def crash(*a, read_jpeg, **k):
        calls = {"n": 0}

        def reader(s):
            calls["n"] += 1
            if calls["n"] == 20:
                raise KeyboardInterrupt("simulated crash")
            return read_jpeg(s)
        return real(*a, read_jpeg=reader, **k)

    bw.write_beton = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            convert(ConvertConfig(out=str(tmp_path / "crash"), **cfg))
    finally:
        bw.write_beton = real
    assert not list((tmp_path / "crash" / "train").glob("*.beton*"))
    convert(ConvertConfig(out=str(tmp_path / "crash"), **cfg))
    assert _files(tmp_path / "crash" / "train") == _files(tmp_path / "clean" / "train")


def test_source_change_refuses_resume(tmp_path):
    from pipeline.synthetic.images import make
    src = tmp_path / "src"
    make(src, classes=2, train_per_class=6, val_per_class=0, progress=False)
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    cfg = ConvertConfig(src=str(src), out=str(out), split="train", shard_size=4, progress=False)
    from pipeline.convert.engine import Progress
    from pipeline.convert.images import scan
    from pipeline.convert.atomic import atomic_write_json
    from dataclasses import asdict
    atomic_write_json(out / "train" / PROGRESS, asdict(Progress(args=cfg.output_args(), fingerprint=scan(cfg).fingerprint,
                                                                class_counts=[0, 0])))
    (src / "train" / "n90000000" / "n90000000_0.JPEG").unlink()
    with pytest.raises(ConversionError, match="changed"):
        convert(cfg)


def test_flat_val_with_label_csv(synth_src, tmp_path):
    src, _ = synth_src
    m = convert(ConvertConfig(src=str(src), out=str(tmp_path), split="val", progress=False))
    assert m["num_samples"] == 18 and m["class_counts"][:6] == [3] * 6
    # the class list comes from train/, so val labels use the standard (train folder) index
    assert m["classes"] == sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    rep = inspect(tmp_path / "val", decode=False, formats=("tarfile", "ffcv"))
    assert rep["problems"] == []


def test_limit_strict_and_formats(synth_src, tmp_path):
    src, _ = synth_src
    m = convert(ConvertConfig(src=str(src), out=str(tmp_path / "lim"), split="val", limit=2, progress=False))
    assert m["num_samples"] == 12
    with pytest.raises(ConversionError, match="--strict"):
        convert(ConvertConfig(src=str(src), out=str(tmp_path / "strict"), split="train", strict=True, progress=False))
    m = convert(ConvertConfig(src=str(src), out=str(tmp_path / "ffcv"), split="val", formats=("ffcv",), progress=False))
    assert m["shards"] == [] and sorted(p.name for p in (tmp_path / "ffcv" / "val").iterdir()) == \
        ["bad_files.jsonl", "manifest.json", "val.beton"]
    assert inspect(tmp_path / "ffcv" / "val", decode=True)["problems"] == []
    m = convert(ConvertConfig(src=str(src), out=str(tmp_path / "wds"), split="val", formats=("wds",), progress=False))
    assert m["beton"] is None and not list((tmp_path / "wds" / "val").glob("*.beton"))


def test_cli_help_and_clear_errors(tmp_path):
    r = subprocess.run(_cli("--help"), capture_output=True, text=True)
    assert r.returncode == 0 and "--shard-size" in r.stdout and "--max-side" in r.stdout
    r = subprocess.run(_cli("--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")), capture_output=True,
                       text=True)
    assert r.returncode == 2 and "is not a directory" in r.stderr
    for tool in ("make_synthetic.py", "inspect_dataset.py", "bench_convert.py"):
        r = subprocess.run([sys.executable, str(ROOT / "tools" / tool), "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in r.stdout, tool


@pytest.mark.parametrize("name", ["a", "000000001.jpg", "ñandú_日本.label.i64", "x" * 99, "x" * 100])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 92_000, 8 ** 11 - 1])
def test_fast_tar_header_equals_tarfile(name, size):
    from pipeline.convert.tar_writer import fast_tar_header, tar_header
    assert fast_tar_header(name, size) == tar_header(name, size)


@pytest.mark.parametrize("line, what", [("jpg 512 100", "groups"), ("jpg x 100 000000001.jpg", "not a number"),
                                        ("", "groups")])
def test_malformed_dali_index_line_names_file_and_line(tmp_path, line, what):
    """The one DALI-index parser (loaders and the .beton writer): a malformed sample line fails naming the
    file and the line, instead of silently dropping members."""
    from pipeline.format.errors import ShardError
    from pipeline.format.shard_index import shard_entries
    (tmp_path / "s.tar").write_bytes(b"")
    (tmp_path / "s.idx").write_text(f"v1.2 2\njpg 512 100 000000000.jpg cls 1024 1 000000000.cls\n{line}\n")
    with pytest.raises(ShardError, match=f"s.idx line 3: .*{what}"):
        shard_entries(tmp_path, {"tar": "s.tar", "idx": "s.idx", "num_samples": 2, "first_index": 0})
