"""Videos named by id in one folder, labelled by a CSV or JSON: Something-Something v2's layout
(``<id>.webm`` files, labels in ``something-something-v2-train.json`` as templates, class order in
``labels.json``) beside 20BN-Jester's frame folders, for ``scan_frame_folders``, ``c3dzoo train
--labels/--classes`` and ``c3dzoo evaluate --labels``."""

from __future__ import annotations

import csv
import json

import pytest

from c3dzoo import cli
from c3dzoo.data import ClipSampler, DataError, read_class_names, scan_frame_folders

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
