"""Videos named by id in one folder, labelled by a CSV or JSON: Something-Something v2's layout
(``<id>.webm`` files, labels in ``something-something-v2-train.json`` as templates, class order in
``labels.json``) beside 20BN-Jester's frame folders, and Kinetics' (``<youtube_id>_<start>_<end>.mp4``
and its annotation CSV, some clips never downloaded), for ``scan_frame_folders``, ``c3dzoo train
--labels/--classes`` and ``c3dzoo evaluate --labels``."""

from __future__ import annotations

import csv
import json

import pytest

from c3dzoo import cli
from c3dzoo.data import ClipSampler, DataError, SkippedVideoWarning, read_class_names, scan_frame_folders

from test_data_folders import make_frame_folder, make_video

TEMPLATES = ("Pushing [something] from left to right", "Putting [something] on [something]")
CLASS_INDEX = {"Putting something on something": "0", "Pushing something from left to right": "1"}


def _entry(video_id: str, template: str) -> dict:
    return {"id": video_id, "label": f"{template.lower()} (filled in)", "template": template,
            "placeholders": ["a pen", "a table"]}


@pytest.fixture(scope="module")
def ssv2(tmp_path_factory):
    """8 VP9 .webm videos named by id and one frame folder, train/validation JSON and labels.json."""
    folder = tmp_path_factory.mktemp("ssv2")
    root = folder / "20bn-something-something-v2"
    root.mkdir()
    for i in range(8):
        make_video(root / f"{1000 + i}.webm", frames=20, codec="libvpx-vp9")
    make_frame_folder(root / "1008", frames=20)
    train = [_entry(str(1000 + i), TEMPLATES[i % 2]) for i in range(6)]
    val = [_entry(str(1000 + i), TEMPLATES[i % 2]) for i in (6, 7, 8)]
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "validation.json").write_text(json.dumps(val))
    (folder / "labels.json").write_text(json.dumps(CLASS_INDEX))
    (folder / "test.json").write_text(json.dumps([{"id": "1007"}]))  # the test split has no labels
    return folder, root


def test_json_labels_and_class_index(ssv2):
    folder, root = ssv2
    names = read_class_names(str(folder / "labels.json"))
    assert names == ["Putting something on something", "Pushing something from left to right"]
    found = scan_frame_folders(str(root), str(folder / "validation.json"), ClipSampler(8), names)
    assert [v.path for v in found.videos] == [str(root / "1006.webm"), str(root / "1007.webm"), str(root / "1008")]
    assert [v.label for v in found.videos] == [1, 0, 1]  # the template, brackets dropped, by labels.json's index
    assert all(v.num_frames == 20 for v in found.videos)
    # without a class list: the sorted labels
    found = scan_frame_folders(str(root), str(folder / "train.json"), ClipSampler(8))
    assert found.class_names == sorted(CLASS_INDEX) and len(found.videos) == 6


def test_ids_with_their_extension_and_csv_labels(ssv2, tmp_path):
    folder, root = ssv2
    labels = tmp_path / "labels.csv"
    labels.write_text("id;label\n1000.webm;push\n1001;put\n1008;push\n")
    found = scan_frame_folders(str(root), str(labels), ClipSampler(8))
    assert [v.path for v in found.videos] == [str(root / "1000.webm"), str(root / "1001.webm"), str(root / "1008")]
    assert found.class_names == ["push", "put"] and [v.label for v in found.videos] == [0, 1, 0]


@pytest.mark.parametrize("text, message", [
    ('[{"id": "1000", "template": "x"}, {"id": "1001"}]', 'entry 1 (id 1001) has no "label" or "template"'),
    ('{"id": "1000"}', "expected a non-empty list"),
    ('[{"label": "x"}]', 'entry 0 is not an object with an "id"'),
    ('[{"id": "4242", "label": "x"}]', "1 of 1 video ids name no frame folder or video file"),
    ("[{", "cannot read labels JSON"),
])
def test_json_label_errors(ssv2, tmp_path, text, message):
    _, root = ssv2
    labels = tmp_path / "bad.json"
    labels.write_text(text)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        scan_frame_folders(str(root), str(labels), ClipSampler(8))


def test_class_index_errors(tmp_path):
    (tmp_path / "bad.json").write_text('{"a": "first"}')
    with pytest.raises(DataError, match="must map names to indices"):
        read_class_names(str(tmp_path / "bad.json"))
    (tmp_path / "worse.json").write_text('[1, 2]')
    with pytest.raises(DataError, match="expected a JSON list of names"):
        read_class_names(str(tmp_path / "worse.json"))
    (tmp_path / "names.json").write_text('["b", "a"]')
    assert read_class_names(str(tmp_path / "names.json")) == ["b", "a"]
    with pytest.raises(DataError, match="class list not found"):
        read_class_names(str(tmp_path / "missing.json"))


def test_train_and_evaluate_on_something_something(ssv2, tmp_path, capsys):
    folder, root = ssv2
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(root), "--labels", str(folder / "train.json"), "--val-labels",
                     str(folder / "validation.json"), "--classes", str(folder / "labels.json"), "--epochs", "1",
                     "--frames", "16", "--size", "32", "--width-mult", "0.0625", "--batch-size", "2",
                     "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("training "))
    assert "6 videos from" in header and "in 2 classes, val 3 (given)" in header
    assert cli.main(["evaluate", str(root), "--labels", str(folder / "validation.json"), "--checkpoint",
                     str(out / "last.pt"), "--clips", "2", "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    assert "on 3 videos from" in capsys.readouterr().out
    with open(tmp_path / "eval" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["video"], r["true"]) for r in rows] == [
        (str(root / "1006.webm"), "Pushing something from left to right"),
        (str(root / "1007.webm"), "Putting something on something"),
        (str(root / "1008"), "Pushing something from left to right")]
    assert cli.main(["evaluate", str(root), "--labels", str(folder / "test.json"), "--checkpoint",
                     str(out / "last.pt"), "--device", "cpu"]) == 2
    assert "a test split without labels?" in capsys.readouterr().err


KINETICS_CSV = ("label,youtube_id,time_start,time_end,split,is_cc\n"
                "abseiling,--07WQ2iBlw,1,11,train,0\n"
                "air drumming,-0S6QsvSoSw,45,55,train,0\n"
                "abseiling,0wR5jVB-WPk,417,427,train,0\n"
                "air drumming,taken_down,12,22,train,0\n")


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory):
    """Kinetics as its downloaders leave it: a flat folder of <youtube_id>_<start>_<end>.mp4 and
    the annotation CSV, one annotated clip not downloaded."""
    folder = tmp_path_factory.mktemp("kinetics")
    root = folder / "train"
    root.mkdir()
    for name in ("--07WQ2iBlw_000001_000011", "-0S6QsvSoSw_000045_000055", "0wR5jVB-WPk_000417_000427"):
        make_video(root / f"{name}.mp4", frames=20)
    (folder / "train.csv").write_text(KINETICS_CSV)
    return folder, root


def test_kinetics_annotations_name_the_downloaded_clips(kinetics):
    folder, root = kinetics
    with pytest.warns(SkippedVideoWarning, match="skipped 1 of 4 annotated Kinetics clips .* taken_down_000012_000022"):
        found = scan_frame_folders(str(root), str(folder / "train.csv"), ClipSampler(8))
    assert found.class_names == ["abseiling", "air drumming"]
    assert [(v.path, v.label) for v in found.videos] == [
        (str(root / "--07WQ2iBlw_000001_000011.mp4"), 0), (str(root / "-0S6QsvSoSw_000045_000055.mp4"), 1),
        (str(root / "0wR5jVB-WPk_000417_000427.mp4"), 0)]
    assert found.unreadable == [(str(root / "taken_down_000012_000022"), "not downloaded (no such file)")]


@pytest.mark.parametrize("text, message", [
    ("label,youtube_id,time_start,time_end,split\nabseiling,nothere,1,11,train\n", "1 of 1 video ids name no"),
    ("label,youtube_id,time_start,time_end,split\nabseiling,--07WQ2iBlw,one,11,train\n",
     "line 2 .* lacks a label, youtube_id or integer times"),
    ("label,youtube_id,time_start,time_end\n", "have no rows"),
])
def test_kinetics_annotation_errors(kinetics, tmp_path, text, message):
    _, root = kinetics
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        scan_frame_folders(str(root), str(tmp_path / "bad.csv"), ClipSampler(8))


def test_train_on_kinetics_counts_the_missing_clip(kinetics, capsys):
    folder, root = kinetics
    assert cli.main(["train", "--data", str(root), "--labels", str(folder / "train.csv"), "--val-split", "0.5",
                     "--epochs", "1", "--frames", "16", "--size", "32", "--width-mult", "0.0625", "--batch-size", "2",
                     "--device", "cpu", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 of 4 annotated Kinetics clips" in captured.err
    header = next(line for line in captured.out.splitlines() if line.startswith("training "))
    assert "2 videos from" in header and "in 2 classes, val 1 (split 0.5)" in header
    assert "skipped 1 unreadable and 0 too-short video(s)" in captured.out


def test_class_folders_spelled_with_underscores_match_the_class_names(tmp_path):
    """Kinetics kept in class folders: downloaders write air_drumming/ for "air drumming"; a
    checkpoint's (or torchvision's) class names still label them. Other names stay an error."""
    from c3dzoo.data import scan_class_folders

    names = ["abseiling", "air drumming", "passing American football (in game)"]
    for folder in ("air_drumming", "passing_american_football_(in_game)"):
        (tmp_path / "val" / folder).mkdir(parents=True)
        make_video(tmp_path / "val" / folder / "clip.mp4", frames=20)
    found = scan_class_folders(str(tmp_path / "val"), ClipSampler(8), names)
    assert sorted((v.path.split("/")[-2], v.label) for v in found.videos) == [
        ("air_drumming", 1), ("passing_american_football_(in_game)", 2)]
    (tmp_path / "val" / "air_guitar").mkdir()
    with pytest.raises(DataError, match="class folder 'air_guitar' is not one of the training classes"):
        scan_class_folders(str(tmp_path / "val"), ClipSampler(8), names)
