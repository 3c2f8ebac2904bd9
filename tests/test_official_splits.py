"""Official splits and leak-free validation: split lists (UCF101's trainlist/testlist) for
``c3dzoo train --train-list/--val-list`` and ``c3dzoo evaluate --list``, and ``--val-split`` by
source-video group for UCF101-named clips (``v_<Class>_gNN_cNN``: clips cut from one video)."""

from __future__ import annotations

import csv

import pytest

from c3dzoo import cli
from c3dzoo.data import (ClipSampler, DataError, VideoItem, read_video_list, scan_class_folders, select_listed,
                         split_videos, ucf101_groups)

from test_data_folders import make_video

CLASSES = ("ApplyEyeMakeup", "Archery")


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    """A UCF101-shaped folder: 2 classes x 3 groups x 2 clips of .avi, and split lists naming
    groups 1-2 for training and group 3 for testing, in UCF101's formats."""
    root = tmp_path_factory.mktemp("ucf") / "UCF-101"
    train, test = [], []
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for group in (1, 2, 3):
            for clip in (1, 2):
                video = f"v_{name}_g{group:02d}_c{clip:02d}.avi"
                make_video(root / name / video, frames=20 + group + clip)
                (test if group == 3 else train).append((f"{name}/{video}", c + 1))
    lists = root.parent / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "trainlist01.txt").write_text("".join(f"{v} {i}\r\n" for v, i in train))  # class index, CRLF
    (lists / "testlist01.txt").write_text("".join(f"{v}\n" for v, _ in test))
    return root, lists


def test_read_video_list_takes_the_first_field_of_each_line(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("\ufeff# a comment\nA/v_A_g01_c01.avi 1\n\n  B/x.mp4\t2\nC\\y.avi\n", encoding="utf-8")
    root = str(tmp_path / "data")
    assert read_video_list(str(listing), root) == [str(tmp_path / "data" / p) for p in
                                                   ("A/v_A_g01_c01.avi", "B/x.mp4", "C/y.avi")]
    with pytest.raises(DataError, match="video list not found"):
        read_video_list(str(tmp_path / "missing.txt"), root)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(DataError, match="names no videos"):
        read_video_list(str(tmp_path / "empty.txt"), root)


def test_select_listed_keeps_the_scan_order_and_names_what_is_missing(ucf, tmp_path):
    root, lists = ucf
    found = scan_class_folders(str(root), ClipSampler(8))
    listed = read_video_list(str(lists / "testlist01.txt"), str(root))
    chosen = select_listed(found, listed[::-1], "testlist01.txt")
    assert [v.path for v in chosen] == sorted(listed) and {v.label for v in chosen} == {0, 1}
    with pytest.raises(DataError, match="1 of 2 listed videos are not in the data folder's class folders "
                                        r"\(first: .*v_Archery_g09_c01.avi\)"):
        select_listed(found, [listed[0], str(root / "Archery" / "v_Archery_g09_c01.avi")], "l.txt")
    with pytest.raises(DataError, match="names .* twice"):
        select_listed(found, [listed[0], listed[0]], "l.txt")
    # listed but left out by the scan (too short for its clips): dropped, not an error
    short = scan_class_folders(str(root), ClipSampler(23, min_frames=23))  # leaves out g01_c01 (22 frames)
    training = read_video_list(str(lists / "trainlist01.txt"), str(root))
    assert {v.path for v in select_listed(short, training, "l.txt")} == {p for p in training if "g01_c01" not in p}


def test_ucf101_groups_keep_a_source_video_on_one_side_of_the_split():
    videos = [VideoItem(f"/d/{c}/v_{c}_g{g:02d}_c{k:02d}.avi", label, 30)
              for label, c in enumerate("AB") for g in range(1, 11) for k in range(1, 1 + g % 3 + 1)]
    groups = ucf101_groups(videos)
    assert groups[:3] == ["01", "01", "02"]
    train, val = split_videos(videos, 0.2, seed=4, groups=groups)
    assert len(train) + len(val) == len(videos)
    group_of = lambda v: (v.label, v.path.split("_g")[1][:2])  # noqa: E731
    assert not {group_of(v) for v in train} & {group_of(v) for v in val}
    assert all(len({group_of(v) for v in val if v.label == c}) == 2 for c in (0, 1))  # 20 % of 10 groups
    # without groups the same call splits clip by clip, and clips of one group land on both sides
    train, val = split_videos(videos, 0.2, seed=4)
    assert {group_of(v) for v in train} & {group_of(v) for v in val}
    assert ucf101_groups(videos + [VideoItem("/d/A/other.mp4", 0, 30)]) is None
    with pytest.raises(ValueError, match="groups for"):
        split_videos(videos, 0.2, 0, groups=groups[:-1])


TRAIN = ["train", "--epochs", "1", "--frames", "16", "--size", "32", "--width-mult", "0.0625", "--batch-size", "2",
         "--device", "cpu", "--no-progress"]


def _header(capsys) -> str:
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("training "))


def test_train_on_an_official_split(ucf, tmp_path, capsys):
    root, lists = ucf
    assert cli.main(TRAIN + ["--data", str(root), "--train-list", str(lists / "trainlist01.txt"),
                             "--val-list", str(lists / "testlist01.txt"), "--out", str(tmp_path / "run")]) == 0
    assert "8 videos from" in (header := _header(capsys)) and "val 4 (listed)" in header
    # the test list alone: every other video trains
    assert cli.main(TRAIN + ["--data", str(root), "--val-list", str(lists / "testlist01.txt")]) == 0
    assert "8 videos from" in (header := _header(capsys)) and "val 4 (listed)" in header
    # --val-split on UCF101 names: whole groups (1 of 3 per class: 2 clips each)
    assert cli.main(TRAIN + ["--data", str(root), "--val-split", "0.34"]) == 0
    header = _header(capsys)
    assert "8 videos from" in header and "val 4 (split 0.34 by UCF101 source-video group)" in header
    # the checkpoint evaluates on the test list only
    assert cli.main(["evaluate", str(root), "--list", str(lists / "testlist01.txt"), "--checkpoint",
                     str(tmp_path / "run" / "last.pt"), "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    assert "on 4 videos from" in capsys.readouterr().out
    with open(tmp_path / "eval" / "predictions.csv", newline="") as f:
        evaluated = sorted(row["video"] for row in csv.DictReader(f))
    assert evaluated == sorted(read_video_list(str(lists / "testlist01.txt"), str(root)))


@pytest.mark.parametrize("extra, message", [
    (["--train-list", "{lists}/trainlist01.txt", "--val-list", "{lists}/trainlist01.txt"],
     "8 videos are in both --train-list and --val-list"),
    (["--val-list", "{lists}/testlist01.txt", "--val-split", "0.2"], "give one of --val-data/--val-labels"),
    (["--labels", "{lists}/x.csv", "--train-list", "{lists}/trainlist01.txt"], "split by their labels files"),
    (["--val-list", "{lists}/missing.txt"], "video list not found"),
])
def test_split_list_errors(ucf, extra, message, capsys):
    root, lists = ucf
    argv = TRAIN + ["--data", str(root)] + [a.format(lists=lists) for a in extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("c3dzoo: error: ") and message in err and "\n" not in err, err


def test_list_options_need_real_data(capsys):
    assert cli.main(TRAIN + ["--val-list", "testlist01.txt"]) == 2
    assert "--val-list is for real data" in capsys.readouterr().err
