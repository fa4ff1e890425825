"""tools/convert_video.py: round trips (tarfile, webdataset, PyAV), DALI index, bad inputs and the
re-encode policies, resume after kill -9, determinism, refusal of a changed argument set, Kinetics."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

from pipeline.format import layout as fmt  # noqa: E402
from pipeline.convert import PROGRESS, ConversionError  # noqa: E402
from pipeline.convert.video import VideoConvertConfig, convert_video  # noqa: E402
from pipeline.synthetic.video import BAD_ZOO, HUGE_SIZE, make_kinetics, make_ucf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# What each bad input of the zoo must be reported as (default arguments: no --max-side).
EXPECTED_REASON = {
    "zero_bytes": "empty file",
    "truncated": "truncated or corrupt container",
    "truncated_tail": "truncated: the header announces",
    "not_a_video": "not a video",
    "header_only": "no decodable frames",
    "audio_only": "no video stream (audio only)",
    "huge": "too large",
}


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _members(split_dir: Path, manifest: dict) -> dict[int, dict]:
    out = {}
    for sh in manifest["shards"]:
        with tarfile.open(split_dir / sh["tar"]) as tf:
            for m in tf:
                key, _, ext = m.name.partition(".")
                assert int(key) not in out or ext not in out[int(key)], f"duplicate {m.name}"
                out.setdefault(int(key), {})[ext] = tf.extractfile(m).read()
    return out


def _decode(mp4: bytes) -> tuple[list, object]:
    """Frames (pts, key_frame, width, height) in presentation order and the stream's pix_fmt."""
    with av.open(io.BytesIO(mp4)) as c:
        vs = c.streams.video[0]
        frames = [(f.pts, f.key_frame, f.width, f.height) for f in c.decode(vs)]
        return frames, vs.codec_context.pix_fmt


def _listed(src: Path, name: str) -> list[str]:
    return [line.split()[0] for line in (src / "ucfTrainTestlist" / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def ucf_src(tmp_path_factory):
    """4 motion classes x 4 videos (.avi MPEG-4 and .mp4 H.264 alternating) + the bad-input zoo."""
    src = tmp_path_factory.mktemp("ucf")
    zoo = make_ucf(src, classes=4, per_class=4, container="mix", with_bad_files=True, seed=1)
    return src, zoo


@pytest.fixture(scope="module")
def ucf_conv(ucf_src, tmp_path_factory):
    src, _ = ucf_src
    out = tmp_path_factory.mktemp("ucf_out")
    m = convert_video(VideoConvertConfig(src=str(src), out=str(out), split="train", split_file="trainlist01.txt",
                                         shard_size=4, workers=2, progress=False))
    return out / "train", m


def test_round_trip_tarfile_webdataset_pyav(ucf_src, ucf_conv):
    import webdataset as wds
    src, zoo = ucf_src
    split_dir, manifest = ucf_conv
    expect = {p for p in _listed(src, "trainlist01.txt") if zoo.get(p) in (None, "converted")}
    members = _members(split_dir, manifest)
    n = manifest["num_samples"]
    assert manifest["kind"] == "video" and manifest["layout"] == "ucf"
    assert sorted(members) == list(range(n)) and n == len(expect)
    assert manifest["classes"] == ["MoveRight", "MoveLeft", "MoveDown", "MoveUp"]  # classInd.txt order
    sources = []
    for idx, m in members.items():
        assert tuple(m) == fmt.VIDEO_MEMBER_EXTS
        meta = json.loads(m["json"])
        assert set(meta) == {"index", "label", "class", "source", "fps", "num_frames", "duration", "width",
                             "height", "keyint"}
        assert meta["index"] == idx == int(np.frombuffer(m["index.i64"], "<i8")[0])
        assert meta["label"] == int(m["cls"]) == int(np.frombuffer(m["label.i64"], "<i8")[0])
        assert manifest["classes"][meta["label"]] == meta["class"] == meta["source"].split("/")[0]
        frames, pix_fmt = _decode(m["mp4"])
        assert len(frames) == meta["num_frames"] and pix_fmt == "yuv420p"
        assert {(w, h) for _, _, w, h in frames} == {(meta["width"], meta["height"])}
        assert meta["duration"] == pytest.approx(meta["num_frames"] / meta["fps"], abs=1e-5)
        keys = [i for i, (_, k, _, _) in enumerate(frames) if k] + [len(frames)]
        assert keys[0] == 0 and max(np.diff(keys)) <= meta["keyint"]
        sources.append(meta["source"])
    assert sorted(sources) == sorted(expect)
    assert sum(manifest["class_counts"]) == n
    assert manifest["total_frames"] == sum(json.loads(m["json"])["num_frames"] for m in members.values())
    # webdataset's own reader sees every sample once, with the same metadata
    urls = [str(split_dir / sh["tar"]) for sh in manifest["shards"]]
    got = {}
    for key, mp4, meta, cls in wds.WebDataset(urls, shardshuffle=False, empty_check=False).to_tuple(
            "__key__", "mp4", "json", "cls"):
        meta = json.loads(meta)
        assert key not in got and int(key) == meta["index"] and int(cls) == meta["label"]
        assert mp4 == members[meta["index"]]["mp4"]
        got[key] = meta["source"]
    assert sorted(got.values()) == sorted(expect)


def test_dali_index_matches_wds2idx(ucf_conv, tmp_path):
    from wds2idx import IndexCreator
    split_dir, manifest = ucf_conv
    assert len(manifest["shards"]) >= 3
    for sh in manifest["shards"]:
        ref = tmp_path / "ref.idx"
        with IndexCreator(str(split_dir / sh["tar"]), str(ref), verbose=False) as ic:
            ic.create_index()
        assert ref.read_bytes() == (split_dir / sh["idx"]).read_bytes()


def test_bad_file_zoo_reported_with_reasons(ucf_src, ucf_conv):
    src, zoo = ucf_src
    split_dir, manifest = ucf_conv
    bad = [json.loads(line) for line in (split_dir / fmt.BAD_FILES).read_text().splitlines()]
    assert {b["path"] for b in bad} == {p for p, kind in zoo.items() if kind in ("bad", "huge")}
    names = {f"v_{p.split('/')[0]}_{z}.{ext}": z for p in zoo for z, ext, _ in BAD_ZOO}
    for b in bad:
        z = names[b["path"].split("/")[1]]
        assert b["reason"].startswith(EXPECTED_REASON[z]), (z, b["reason"])
    assert manifest["num_bad"] == len(bad) == len(EXPECTED_REASON)
    assert sum(manifest["bad_reasons"].values()) == len(bad)


def test_passthrough_and_reencode_policies(ucf_src, ucf_conv):
    src, _ = ucf_src
    split_dir, manifest = ucf_conv
    by_source = {json.loads(m["json"])["source"]: m for m in _members(split_dir, manifest).values()}
    mp4s = [s for s in by_source if s.endswith(".mp4") and "_g" in s]
    avis = [s for s in by_source if s.endswith(".avi") and "_g" in s]
    assert mp4s and avis
    for s in mp4s:  # constant-rate H.264 yuv420p MP4 with short GOPs: kept byte for byte
        assert by_source[s]["mp4"] == (src / s).read_bytes()
    for s in avis:  # MPEG-4 Part 2 in AVI: re-encoded, IDR exactly every --keyint (16) frames
        meta = json.loads(by_source[s]["json"])
        frames, _ = _decode(by_source[s]["mp4"])
        assert meta["keyint"] == 16 and [i for i, f in enumerate(frames) if f[1]] == [0, 16]
        assert meta["num_frames"] == 32 and meta["fps"] == 16.0
    # variable frame rate: re-encoded at a constant 16 fps; the 3-period gaps are filled by repeats
    vfr = by_source["MoveRight/v_MoveRight_variable_fps.mp4"]
    meta = json.loads(vfr["json"])
    frames, _ = _decode(vfr["mp4"])
    gaps = np.where(np.arange(31) % 4 == 3, 3, 1)
    assert meta["fps"] == 16.0 and meta["num_frames"] == len(frames) == gaps.sum() + 1
    assert len(set(np.diff([p for p, *_ in frames]))) == 1
    assert json.loads(by_source["MoveLeft/v_MoveLeft_yuv444.mp4"]["json"])["num_frames"] == 32
    odd = json.loads(by_source["MoveRight/v_MoveRight_odd_size.avi"]["json"])
    assert (odd["width"], odd["height"]) == (64, 48)
    acts = manifest["actions"]
    assert acts["passthrough"] == len(mp4s) and acts["reencode:vfr"] == 1 and acts["reencode:pix_fmt"] == 1
    assert acts["reencode:container"] == len(avis) + 1


def test_deterministic_across_runs_and_workers(ucf_src, ucf_conv, tmp_path):
    src, _ = ucf_src
    split_dir, _ = ucf_conv
    convert_video(VideoConvertConfig(src=str(src), out=str(tmp_path), split="train", split_file="trainlist01.txt",
                                     shard_size=4, workers=1, progress=False))
    assert _files(tmp_path / "train") == _files(split_dir)


def test_max_side_downscales_huge_and_reencode_always(ucf_src, tmp_path):
    src, zoo = ucf_src
    m = convert_video(VideoConvertConfig(src=str(src), out=str(tmp_path), split="train",
                                         split_file="trainlist01.txt", max_side=48, reencode="always",
                                         workers=2, shard_size=8, progress=False))
    members = {json.loads(v["json"])["source"]: v for v in _members(tmp_path / "train", m).values()}
    huge = json.loads(members["MoveLeft/v_MoveLeft_huge.mp4"]["json"])
    assert (huge["width"], huge["height"]) == (48, 36) and HUGE_SIZE == (4000, 3000)
    for s, v in members.items():
        meta = json.loads(v["json"])
        assert max(meta["width"], meta["height"]) <= 48 and meta["keyint"] == 16
        frames, _ = _decode(v["mp4"])
        assert len(frames) == meta["num_frames"] and (frames[0][2], frames[0][3]) == (meta["width"], meta["height"])
    assert set(m["actions"]) == {"reencode:always"}
    assert m["num_bad"] == sum(kind == "bad" for kind in zoo.values())


def test_reencode_never_and_test_list(ucf_src, tmp_path):
    src, _ = ucf_src
    listed = _listed(src, "testlist01.txt")
    m = convert_video(VideoConvertConfig(src=str(src), out=str(tmp_path), split="val", split_file="testlist01.txt",
                                         reencode="never", workers=1, progress=False))
    bad = [json.loads(line) for line in (tmp_path / "val" / fmt.BAD_FILES).read_text().splitlines()]
    assert {b["path"] for b in bad} == {p for p in listed if p.endswith(".avi")}
    assert all("needs re-encoding (container" in b["reason"] for b in bad)
    assert m["num_samples"] == sum(p.endswith(".mp4") for p in listed) and m["actions"] == {"passthrough": 4}


def test_same_out_different_arguments_refuses(ucf_src, ucf_conv):
    src, _ = ucf_src
    split_dir, _ = ucf_conv
    base = dict(src=str(src), out=str(split_dir.parent), split="train", split_file="trainlist01.txt", progress=False)
    with pytest.raises(ConversionError, match="different arguments.*keyint: was 16, now 8"):
        convert_video(VideoConvertConfig(shard_size=4, keyint=8, **base))
    with pytest.raises(ConversionError, match="different arguments.*shard_size"):
        convert_video(VideoConvertConfig(shard_size=3, **base))
    before = _files(split_dir)
    convert_video(VideoConvertConfig(shard_size=4, workers=1, **base))  # same arguments: a no-op
    assert _files(split_dir) == before


def _cli(*args):
    return [sys.executable, str(ROOT / "tools" / "convert_video.py"), "--no-progress", *args]


def test_kill_9_then_rerun_is_byte_identical(ucf_src, tmp_path):
    src, _ = ucf_src
    args = ["--src", str(src), "--split", "train", "--shard-size", "1", "--workers", "1", "--max-side", "32"]
    clean = tmp_path / "clean"
    r = subprocess.run(_cli(*args, "--out", str(clean)), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    killed = tmp_path / "killed"
    kills = 0
    for wait_shards in (2, 7):  # kill twice, at different points of the run
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
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills == 2, "conversion finished before it could be killed"
    assert not (killed / "train" / fmt.MANIFEST).exists()
    assert 7 <= len(json.loads((killed / "train" / PROGRESS).read_text())["shards"]) < 20
    r = subprocess.run(_cli(*args, "--out", str(killed)), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _files(killed / "train") == _files(clean / "train")
    # without --split-file every video of every class folder is a candidate; README.txt is ignored
    m = json.loads((clean / "train" / fmt.MANIFEST).read_text())
    assert m["num_ignored"] == 1 and m["num_samples"] == 16 + 4  # 16 videos + 4 repaired zoo files


def test_kinetics_round_trip(tmp_path):
    import webdataset as wds
    src = tmp_path / "k"
    zoo = make_kinetics(src, classes=3, per_class=3, val_per_class=1, seed=2, with_bad_files=True)
    m = convert_video(VideoConvertConfig(src=str(src), out=str(tmp_path / "out"), split="train", shard_size=4,
                                         workers=2, progress=False))
    assert m["layout"] == "kinetics" and m["classes"] == ["move down", "move left", "move right"]
    split_dir = tmp_path / "out" / "train"
    bad = {json.loads(line)["path"]: json.loads(line)["reason"]
           for line in (split_dir / fmt.BAD_FILES).read_text().splitlines()}
    assert set(bad) == {p for p, kind in zoo.items() if kind in ("bad", "huge", "missing")}
    assert bad["train/move right/missingfile_000000_000010.mp4"] == "missing"
    members = _members(split_dir, m)
    expect = {str(p.relative_to(src)) for p in (src / "train").rglob("*") if p.is_file()} - set(zoo)
    expect |= {p for p, kind in zoo.items() if kind == "converted"}
    got = {}
    for key, meta in wds.WebDataset([str(split_dir / sh["tar"]) for sh in m["shards"]], shardshuffle=False,
                                    empty_check=False).to_tuple("__key__", "json"):
        meta = json.loads(meta)
        got[meta["source"]] = meta
        assert meta["index"] == int(key) and m["classes"][meta["label"]] == meta["class"]
        assert meta["source"].split("/")[1] == meta["class"]
        frames, _ = _decode(members[meta["index"]]["mp4"])
        assert len(frames) == meta["num_frames"]
    assert set(got) == expect and len(got) == m["num_samples"] == len(members)
    # val: val.csv, labels from train.csv
    mv = convert_video(VideoConvertConfig(src=str(src), out=str(tmp_path / "out"), split="val", workers=1,
                                          progress=False))
    assert mv["classes"] == m["classes"] and mv["num_samples"] == 3 and mv["num_bad"] == 0


def test_more_bad_inputs_and_kinetics_name_variants(tmp_path):
    from pipeline.convert.video_codec import BadVideo, VideoOptions, normalize_video
    from pipeline.synthetic.video import encode_video
    flat = np.zeros((32, 64, 64, 3), np.uint8) + (np.arange(32) * 8).astype(np.uint8)[:, None, None, None]
    mp4 = bytearray(encode_video(flat, 16, "mp4"))
    mp4[len(mp4) // 3:len(mp4) // 3 + 200] = np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()
    (tmp_path / "garbled.mp4").write_bytes(bytes(mp4))
    (tmp_path / "broken.mp4").symlink_to(tmp_path / "nowhere.mp4")
    for name, reason in (("garbled.mp4", "corrupt: decoding failed after"), ("broken.mp4", "broken symlink")):
        with pytest.raises(BadVideo, match=reason):
            normalize_video(str(tmp_path / name), VideoOptions())
    # Kinetics: label folders with underscores, files named <youtube_id>.<ext>, any video extension
    src = tmp_path / "k"
    (src / "train" / "play_cards").mkdir(parents=True)
    (src / "train" / "play_cards" / "abcdefghijk.mkv").write_bytes(encode_video(flat[:8], 16, "mp4"))
    (src / "train.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                   "play cards,abcdefghijk,1,11,train\nplay cards,zzzzzzzzzzz,2,12,train\n")
    m = convert_video(VideoConvertConfig(src=str(src), out=str(tmp_path / "o"), split="train", workers=1,
                                         progress=False))
    assert m["num_samples"] == 1 and m["classes"] == ["play cards"] and m["bad_reasons"] == {"missing": 1}
    assert m["actions"] == {"passthrough": 1}  # MP4 bytes under a .mkv name: the content decides, not the name


def test_reencoding_reads_no_uninitialised_memory(tmp_path):
    """Byte-identical output must not depend on what the heap held before: x264's AVX-512 code read
    uninitialised memory at 320x240 (outputs differed between runs until x264 was limited to AVX2, see
    x264_asm_param). glibc's MALLOC_PERTURB_ fills every new allocation with a given byte; two values
    must give the same bytes."""
    import os
    from pipeline.synthetic.video import encode_video, render_video
    src = tmp_path / "v.avi"
    src.write_bytes(encode_video(render_video(0, np.random.default_rng(0), 32, (320, 240)), 25, "avi"))
    code = ("import hashlib, sys; from pipeline.convert.video_codec import VideoOptions, normalize_video; "
            "print(hashlib.sha256(normalize_video(sys.argv[1], VideoOptions()).mp4).hexdigest())")
    outs = {subprocess.run([sys.executable, "-c", code, str(src)], env={**os.environ, "MALLOC_PERTURB_": pb},
                           capture_output=True, text=True, check=True, cwd=ROOT).stdout for pb in ("1", "255")}
    assert len(outs) == 1, outs


def test_synthetic_is_deterministic_and_motion_classes(tmp_path):
    make_ucf(tmp_path / "a", classes=2, per_class=1, frames=8, seed=3)
    make_ucf(tmp_path / "b", classes=2, per_class=1, frames=8, seed=3)
    a = {str(p.relative_to(tmp_path / "a")): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    b = {str(p.relative_to(tmp_path / "b")): p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert a == b and len(a) == 5
    from pipeline.synthetic.video import trajectory
    for c, axis, sign in ((0, 0, 1), (1, 0, -1), (2, 1, 1), (3, 1, -1)):
        pos = trajectory(c, np.random.default_rng(c), 16)[axis]
        assert np.sign(pos[-1] - pos[0]) == sign
    r = trajectory(6, np.random.default_rng(0), 16)[2]
    assert r[-1] > r[0] * 2  # Grow


def test_cli_help_and_clear_errors(tmp_path):
    r = subprocess.run(_cli("--help"), capture_output=True, text=True)
    assert r.returncode == 0 and "--split-file" in r.stdout and "--reencode" in r.stdout and "--keyint" in r.stdout
    r = subprocess.run(_cli("--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")), capture_output=True,
                       text=True)
    assert r.returncode == 2 and "is not a directory" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic_video.py"), "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--with-bad-files" in r.stdout and "--layout" in r.stdout


@pytest.mark.parametrize("via", ["auto", "folder"])
def test_class_folder_tree_like_the_image_converter(ucf_src, ucf_conv, tmp_path, via):
    """SRC/<split>/<class>/*.mp4|avi (the image converter's convention) converts for any split name: labels
    are the sorted class folders, other files and sub-folders are ignored and counted, and the stored
    videos are the same bytes as the UCF-layout conversion of the same files."""
    src, zoo = ucf_src
    split_dir, manifest = ucf_conv
    tree = tmp_path / "tree"
    ucf_members = {json.loads(m["json"])["source"]: m["mp4"] for m in _members(split_dir, manifest).values()}
    by_class: dict[str, list[str]] = {}
    for rel in ucf_members:
        cls, name = rel.split("/")
        for split in ("train", "val"):
            (tree / split / cls).mkdir(parents=True, exist_ok=True)
            (tree / split / cls / name).write_bytes((src / rel).read_bytes())
        by_class.setdefault(cls, []).append(name)
    (tree / "val" / "MoveUp" / "notes.txt").write_text("not a video")
    (tree / "val" / "MoveUp" / "extra").mkdir()
    for split in ("train", "val"):
        m = convert_video(VideoConvertConfig(src=str(tree), out=str(tmp_path / "out"), split=split, shard_size=4,
                                             layout=via, workers=2, progress=False))
        assert m["layout"] == "folder" and m["classes"] == sorted(by_class)
        assert m["num_samples"] == len(ucf_members) and m["num_bad"] == 0
        assert m["num_ignored"] == (2 if split == "val" else 0)
        for mem in _members(tmp_path / "out" / split, m).values():
            meta = json.loads(mem["json"])
            s, cls, name = meta["source"].split("/")
            assert s == split and m["classes"][meta["label"]] == cls
            assert mem["mp4"] == ucf_members[f"{cls}/{name}"]


def test_folder_layout_errors(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(ConversionError, match="is not a directory"):
        convert_video(VideoConvertConfig(src=str(tmp_path / "src"), out=str(tmp_path / "o"), split="train",
                                         layout="folder", progress=False))
