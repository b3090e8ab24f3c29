"""Data kinds: the embedded scenes, COCO, Cityscapes and a folder of images and masks behind one seam
(``data.kind``). Each real kind reads a tiny layout written by :mod:`layouts`; bad data is refused by the manifest
loader in one line before any work, and every kind runs end to end through ``maskd-bench run``."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import random
import re
import shutil

import numpy as np
import pytest
import torch
from layouts import (
    CITYSCAPES_IDS,
    COCO_TRAIN,
    COCO_TRAIN_KEPT,
    COCO_VAL,
    FOLDER_CLASSES,
    FOLDER_IMAGES,
    folder_mask,
    write_cityscapes,
    write_coco,
    write_folder,
)
from PIL import Image
from torch import nn

from experiments.cli import main
from experiments.datasets import DataKind, get_kind, kind_names, kind_of, kinds, register, unregister
from experiments.datasets._common import MEAN_FILL
from experiments.engine import data as scenes
from experiments.engine.fingerprint import stage_roots
from experiments.engine.manifest import MANIFEST_DIR, ManifestError, load_manifest
from experiments.engine.models import DetectorConfig
from experiments.tasks import get_task, segmentation

DET = "embedded_detection_smoke"
SEG = "embedded_segmentation_smoke"
CLASSES = 'data.classes=["background", "road", "car"]'


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    # a cache per test, removed with its folder when the test passes: the real-data runs share no stage
    monkeypatch.setenv("MASKD_BENCH_CACHE", str(tmp_path / "maskd-cache"))


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    return write_cityscapes(tmp_path_factory.mktemp("cityscapes"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("folder"))


#: What the smoke manifests take from the embedded scenes and real data lacks: a test split, the digit pretraining
#: and (with random transforms) the teacher-output cache.
EMBEDDED_ONLY_OFF = ["protocol.eval_split=val", "pretrain.enabled=false", "distill.teacher_cache=false"]


def coco_sets(root, *more):
    return [
        "data.kind=coco",
        f"data.root={root}",
        "data.image_size=128",
        "data.max_size=160",
        *EMBEDDED_ONLY_OFF,
        *more,
    ]


def cityscapes_sets(root, *more):
    return ["data.kind=cityscapes", f"data.root={root}", "data.crop_size=[64, 64]", *EMBEDDED_ONLY_OFF, *more]


def folder_sets(root, *more):
    return ["data.kind=folder", f"data.root={root}", CLASSES, "data.crop_size=[64, 64]", *EMBEDDED_ONLY_OFF, *more]


def refused(name, sets) -> str:
    with pytest.raises(ManifestError) as info:
        load_manifest(name, sets=sets)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------ registry and manifests
def test_registry_lists_every_kind_and_the_tasks_they_serve():
    assert kind_names() == ["embedded", "cityscapes", "coco", "folder"]
    assert kind_names("detection") == ["embedded", "coco"]
    assert kind_names("segmentation") == ["embedded", "cityscapes", "folder"]
    assert not get_kind("embedded").random_transforms
    assert all(get_kind(n).random_transforms for n in ("coco", "cityscapes", "folder"))
    for name, kind in kinds().items():
        assert kind.config.kind == name and "kind" not in {f.name for f in dataclasses.fields(kind.config)}
    with pytest.raises(KeyError, match="unknown data kind 'imagenet'; registered: embedded, cityscapes"):
        get_kind("imagenet")


def test_a_toy_kind_registered_in_one_place_is_a_manifest_choice(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class ToyConfig:
        image_size: int = 128

    class Toy(DataKind):
        name = "toy"
        config = ToyConfig
        tasks = frozenset({"detection"})

        def num_classes(self, cfg, task):
            return 6

    register(Toy())
    try:
        assert kind_names("detection") == ["embedded", "coco", "toy"]
        m = load_manifest(DET, sets=["data.kind=toy", "data.image_size=64", *EMBEDDED_ONLY_OFF])
        assert m.data == ToyConfig(64) and kind_of(m.data).name == "toy" and m.flat()["data.kind"] == "toy"
        assert m.teacher.num_classes == 6 and m.student.image_size == 64
    finally:
        unregister("toy")
    assert "toy" not in kind_names()


def test_embedded_is_the_default_and_gives_the_same_data_as_before(tmp_path):
    m = load_manifest(DET, sets=["data.num_train=3", "data.num_val=2"])
    assert m.data.kind == "embedded" and isinstance(m.data, scenes.SceneConfig)
    assert "kind" not in dataclasses.asdict(m.data)  # the stage hashes of embedded runs are unchanged
    assert m.flat()["data.kind"] == "embedded" and m.flat()["data.num_train"] == "3"
    train, val, gt = get_task("detection").datasets(m)
    root = scenes.generate_scenes(m.data, progress=False)
    assert gt == root / "annotations" / "instances_val.json"
    for ours, theirs in (
        (train, scenes.detection_dataset(root, "train")),
        (val, scenes.detection_dataset(root, "val")),
    ):
        assert len(ours) == len(theirs)
        for i in range(len(ours)):
            (a, ta), (b, tb) = ours[i], theirs[i]
            assert (
                torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])
            )
    m = load_manifest(SEG, sets=["data.num_train=3", "data.num_val=2"])
    train, val, gt = get_task("segmentation").datasets(m)
    reference = scenes.segmentation_dataset(gt, "val")
    assert gt == scenes.generate_scenes(m.data, progress=False)
    for i in range(len(val)):
        assert all(torch.equal(x, y) for x, y in zip(val[i], reference[i]))


def test_changing_the_kind_starts_the_data_section_afresh(coco, tmp_path):
    # the smoke manifest's [data] (num_train, num_val, image_size 128) is for the embedded kind: dropped
    m = load_manifest(DET, sets=["data.kind=coco", f"data.root={coco}", *EMBEDDED_ONLY_OFF])
    assert (m.data.image_size, m.data.max_size, m.data.workers, m.data.limit_train) == (800, 1333, 2, 0)
    assert m.teacher.image_size == m.student.image_size == 800
    # the same in a child manifest file
    (tmp_path / "mine.toml").write_text(
        f'base = "{MANIFEST_DIR / (DET + ".toml")}"\n[data]\nkind = "coco"\nroot = "{coco}"\nimage_size = 96\n'
        'max_size = 160\n[protocol]\neval_split = "val"\n[pretrain]\nenabled = false\n'
        "[distill]\nteacher_cache = false\n"
    )
    m = load_manifest(tmp_path / "mine.toml")
    assert m.data.image_size == 96 and m.teacher.image_size == 96
    # keys of another kind given with the new kind are unknown keys
    message = refused(DET, coco_sets(coco, "data.num_train=3"))
    assert message.startswith("unknown key 'data.num_train' in --set data.num_train=3; allowed in data: root,")


def test_real_kinds_set_the_models_classes_and_sizes(coco, cityscapes, folder):
    m = load_manifest(DET, sets=coco_sets(coco))
    assert m.teacher.num_classes == m.student.num_classes == 4  # 3 categories + the unused column 0
    assert m.teacher.image_size == 128
    if "max_size" in {f.name for f in dataclasses.fields(DetectorConfig)}:
        assert m.teacher.max_size == m.student.max_size == 160
    flat = m.flat()
    assert flat["data.kind"] == "coco" and flat["data.root"] == str(coco) and flat["data.multiscale_short"] == "[]"
    assert load_manifest(SEG, sets=cityscapes_sets(cityscapes)).student.num_classes == 19
    assert load_manifest(SEG, sets=folder_sets(folder)).teacher.num_classes == 3
    assert load_manifest(DET, sets=coco_sets(coco, "teacher.num_classes=4")).teacher.num_classes == 4
    message = refused(DET, coco_sets(coco, "teacher.num_classes=11"))
    assert message == (
        "--set teacher.num_classes=11: teacher.num_classes = 11 differs from 4, the classes of the data "
        "(data.kind = 'coco')"
    )


ALLOWED_DET = "allowed: embedded, coco (the data kinds for detection)"
ALLOWED_SEG = "allowed: embedded, cityscapes, folder (the data kinds for segmentation)"
BAD = [
    (DET, ["data.kind=imagenet"], f"--set data.kind=imagenet: data.kind = 'imagenet' is not allowed; {ALLOWED_DET}"),
    (SEG, ["data.kind=coco"], f"--set data.kind=coco: data.kind = 'coco' is not allowed; {ALLOWED_SEG}"),
    (DET, ["data.kind=coco"], "--set data.kind=coco: data.root = '' is not allowed; allowed: the directory of the"),
    (
        DET,
        ["data.kind=coco", "data.root=/nonexistent/coco"],
        "--set data.root=/nonexistent/coco: data.root = '/nonexistent/coco' is not allowed; allowed: an existing",
    ),
    (
        SEG,
        ["data.kind=folder", "data.root=/nonexistent"],
        "--set data.kind=folder: data.classes = [] is not allowed; allowed: a non-empty list of class names",
    ),
    (
        SEG,
        ["data.kind=cityscapes", "data.root=/nonexistent"],
        "--set data.root=/nonexistent: data.root = '/nonexistent' is not allowed",
    ),
    (
        DET,
        ["data.kind=coco", "data.root=.", "data.image_size=800", "data.max_size=800"],
        "--set data.max_size=800: data.max_size = 800 is not allowed; allowed: > data.image_size (800)",
    ),
    (
        DET,
        ["data.kind=coco", "data.root=.", "data.multiscale_short=[800, 640]"],
        "--set data.multiscale_short=[800, 640]: data.multiscale_short = [800, 640] is not allowed",
    ),
    (
        DET,
        ["data.kind=coco", "data.root=.", "data.limit_val=-1"],
        "--set data.limit_val=-1: data.limit_val = -1 is not allowed; allowed: >= 0",
    ),
    (
        SEG,
        ["data.kind=cityscapes", "data.root=.", "data.crop_size=[64]"],
        "--set data.crop_size=[64]: data.crop_size = [64] is not allowed; allowed: [height, width]",
    ),
]


@pytest.mark.parametrize("name, sets, expected", BAD, ids=[" ".join(s) for _, s, _ in BAD])
def test_bad_data_settings_are_one_line(name, sets, expected):
    assert refused(name, sets).startswith(expected)


def test_sizes_must_suit_the_models_stride(coco, cityscapes):
    message = refused(DET, coco_sets(coco, "data.image_size=100"))
    assert message.startswith(
        "--set data.image_size=100: data.image_size = 100 is not allowed; allowed: a multiple of 32"
    )
    message = refused(SEG, cityscapes_sets(cityscapes, "data.crop_size=[60, 64]"))
    assert message.startswith(
        "--set data.crop_size=[60, 64]: data.crop_size = [60, 64] is not allowed; allowed: a multiple of 8"
    )


# ------------------------------------------------------------------------------------------ bad files
def test_a_missing_or_unreadable_annotation_file_is_refused(coco, tmp_path):
    root = shutil.copytree(coco, tmp_path / "coco")
    (root / "annotations" / "instances_val2017.json").unlink()
    message = refused(DET, coco_sets(root))
    assert message.startswith(
        f"--set data.root={root}: data.val_annotations = 'annotations/instances_val2017.json' is not allowed; "
        f"allowed: a COCO instances JSON under data.root ({root}/annotations/instances_val2017.json is missing)"
    )
    (root / "annotations" / "instances_train2017.json").write_text('{"images": [')
    message = refused(DET, coco_sets(root))
    assert "data.train_annotations = 'annotations/instances_train2017.json'" in message
    assert "a readable COCO instances JSON (instances_train2017.json: Expecting value" in message
    (root / "annotations" / "instances_train2017.json").write_text('{"images": []}')
    assert "it has no 'annotations' list" in refused(DET, coco_sets(root))


def test_annotations_naming_missing_images_are_refused(coco, tmp_path):
    root = shutil.copytree(coco, tmp_path / "coco")
    (root / "train2017" / "000000000104.jpg").unlink()
    message = refused(DET, coco_sets(root))
    assert message.startswith(f"--set data.root={root}: data.train_annotations = ")
    assert message.endswith("1 of the 4 images it names are not in train2017/, e.g. 000000000104.jpg")
    # a file with no image, or no category
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(dict(data, images=[])))
    (root / "train2017" / "000000000104.jpg").write_bytes((coco / "train2017" / "000000000104.jpg").read_bytes())
    assert "data.val_annotations" in (msg := refused(DET, coco_sets(root))) and "(it lists none)" in msg
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps(dict(data, categories=data["categories"][:2]))
    )
    message = refused(DET, coco_sets(root))
    assert "data.val_annotations" in message and "annotations whose category_id is a listed category" in message


def test_a_mask_of_another_size_than_its_image_is_refused(cityscapes, folder, tmp_path):
    root = shutil.copytree(cityscapes, tmp_path / "cityscapes")
    mask = root / "gtFine" / "val" / "lindau" / "lindau_000001_000019_gtFine_labelIds.png"
    Image.fromarray(np.zeros((32, 64), dtype=np.uint8)).save(mask)
    message = refused(SEG, cityscapes_sets(root))
    assert message == (
        f"--set data.root={root}: data.root = '{root}' is not allowed; allowed: masks of their image's size: "
        "gtFine/val/lindau/lindau_000001_000019_gtFine_labelIds.png is 64x32, its image 128x64 (width x height)"
    )
    mask.unlink()
    message = refused(SEG, cityscapes_sets(root))
    assert "every image of leftImg8bit/val/ has its mask: 1 of 3 lack theirs, e.g. gtFine/val/lindau/" in message
    shutil.rmtree(root / "gtFine" / "train")
    assert "gtFine/train/ is missing" in refused(SEG, cityscapes_sets(root))

    root = shutil.copytree(folder, tmp_path / "folder")
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(root / "masks" / "train" / "b.png")
    message = refused(SEG, folder_sets(root))
    assert "data.root" in message and "masks/train/b.png is 10x10, its image 56x72" in message
    Image.fromarray(np.zeros((72, 56, 3), dtype=np.uint8)).save(root / "masks" / "train" / "b.png")
    assert "single-channel masks of class indices (masks/train/b.png is RGB)" in refused(SEG, folder_sets(root))
    Image.fromarray(folder_mask(56, 72)).save(root / "masks" / "train" / "b.png")
    for path in (root / "images" / "val").iterdir():
        path.unlink()
    assert "a layout with images in images/val/; there are none" in refused(SEG, folder_sets(root))


def test_check_data_false_loads_a_manifest_without_its_data(coco):
    m = load_manifest(
        DET, sets=["data.kind=coco", *EMBEDDED_ONLY_OFF], check_data=False
    )  # no root: nothing on disk is read
    assert m.data.root == "" and m.teacher.num_classes == 11  # COCO's classes need the file: the manifest's value
    m = load_manifest(
        SEG, sets=["data.kind=cityscapes", "data.crop_size=[64, 64]", *EMBEDDED_ONLY_OFF], check_data=False
    )
    assert m.teacher.num_classes == 19  # known without the files
    assert load_manifest(DET, sets=coco_sets(coco), check_data=False).teacher.num_classes == 4
    with pytest.raises(ManifestError, match="data.limit_val"):  # ranges are still checked
        load_manifest(DET, sets=["data.kind=coco", "data.limit_val=-1"], check_data=False)


def test_the_cli_refuses_bad_data_with_exit_code_2(tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    rc = main(["run", DET, "--set", "data.kind=coco", "--set", f"data.root={tmp_path / 'none'}",
               "--tracking-uri", f"sqlite:///{db}", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "data.root" in err and not db.exists(), err


# ------------------------------------------------------------------------------------------ COCO
def test_coco_targets_drop_crowd_and_degenerate_boxes_and_use_labels_1_to_k(coco, tmp_path, capsys):
    root = shutil.copytree(coco, tmp_path / "coco")  # a fresh path: the degenerate count is printed for it once
    m = load_manifest(DET, sets=coco_sets(root))
    train, val, gt = get_task("detection").datasets(m)
    err = capsys.readouterr().err
    assert "coco: 1 degenerate boxes (zero or negative width or height inside the image) dropped from the " in err
    get_task("detection").datasets(m)
    assert "degenerate" not in capsys.readouterr().err  # once per process
    assert gt.category_ids == (3, 7, 11) and gt.annotations == root / "annotations" / "instances_val2017.json"
    assert [train[i][1]["image_id"] for i in range(len(train))] == [101, 102, 104, 107]
    torch.manual_seed(0)
    for i, (image_id, _, width, height, objects) in enumerate(COCO_TRAIN):
        image, target = train[i]
        assert image.dtype == torch.float32 and 0 <= float(image.min()) and float(image.max()) <= 1
        scale = min(128 / min(width, height), 160 / max(width, height))  # short side 128, long side <= 160
        assert tuple(image.shape) == (3, round(height * scale), round(width * scale))
        assert target["labels"].tolist() == COCO_TRAIN_KEPT[image_id] and target["labels"].dtype == torch.int64
        assert tuple(target["boxes"].shape) == (len(COCO_TRAIN_KEPT[image_id]), 4)
        assert target["boxes"].dtype == torch.float32 and tuple(target["boxes"].canvas_size) == tuple(image.shape[1:])
        kept = [box for _, box, crowd in objects if not crowd and box[2] > 0 and box[3] > 0]
        plain = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in kept]).reshape(-1, 4) * scale
        flipped = plain[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor(
            [image.shape[2], 0, image.shape[2], 0]
        )
        boxes = target["boxes"].as_subclass(torch.Tensor)
        assert torch.allclose(boxes, plain, atol=0.01) or torch.allclose(boxes, flipped, atol=0.01)
    # evaluation images are not resized: the detector's transform resizes and maps boxes back
    for i, (image_id, _, width, height, _) in enumerate(COCO_VAL):
        image, target = val[i]
        assert tuple(image.shape) == (3, height, width) and target["image_id"] == image_id


def test_coco_multiscale_draws_the_short_side_from_a_range(coco):
    # The detector's transform draws the short side per training image (mmdet's "range" mode); the dataset does
    # not resize as well, and evaluation is at image_size.
    m = load_manifest(DET, sets=coco_sets(coco, "data.multiscale_short=[64, 128]", "data.limit_train=1"))
    assert m.student.multiscale_short == (64, 128) and m.teacher.multiscale_short == (64, 128)
    train, _, _ = get_task("detection").datasets(m)
    image = train[0][0]
    assert tuple(image.shape[1:]) == (48, 64)  # image 101 as stored (flip only)
    model = get_task("detection").build_model(m.student).train()
    assert sorted(model.transform.min_size) == list(range(64, 129)) and model.transform.min_size[-1] == 128
    torch.manual_seed(0)
    shorts = {min(model.transform([image])[0].image_sizes[0]) for _ in range(30)}
    assert len(shorts) > 5 and min(shorts) >= 64 and max(shorts) <= 128
    model.eval()
    assert model.transform([image])[0].image_sizes[0] == (120, 160)  # short side 128, capped by max_size 160


def test_augmentation_is_a_function_of_the_torch_seed_alone(coco, cityscapes):
    m = load_manifest(DET, sets=coco_sets(coco, "data.multiscale_short=[64, 128]"))
    train, _, _ = get_task("detection").datasets(m)
    seg = load_manifest(SEG, sets=cityscapes_sets(cityscapes))
    seg_train, _, _ = get_task("segmentation").datasets(seg)

    def draw(seed: int):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(0)
        return [train[i][0] for i in range(len(train))] + [seg_train[i][1] for i in range(len(seg_train))]

    first, second = draw(1), draw(2)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


class ScriptedDetector(nn.Module):
    """Returns the given outputs, in loader order, whatever the images."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, images):
        out, self.outputs = self.outputs[: len(images)], self.outputs[len(images) :]
        return out


def _predictions(seed: int):
    """Per validation image (loader order) predictions with labels 1..3: the ground truth moved and rescored at
    random, a wrong class, and a label 0 that must be dropped."""
    g = torch.Generator().manual_seed(seed)
    outputs = []
    label_of = {3: 1, 7: 2, 11: 3}
    for _, _, width, height, objects in COCO_VAL:
        boxes, labels = [], []
        for category, (x, y, w, h), _ in objects:
            jitter = (torch.rand(4, generator=g) - 0.5) * (0 if seed == 0 else 8)
            boxes.append(torch.tensor([x, y, x + w, y + h]) + jitter)
            labels.append(label_of[category])
        boxes += [torch.tensor([0.0, 0.0, width / 2, height / 2]), torch.tensor([1.0, 1.0, 9.0, 9.0])]
        labels += [2, 0]
        scores = torch.rand(len(boxes), generator=g) * 0.5 + (0.5 if seed == 0 else 0.0)
        outputs.append({"boxes": torch.stack(boxes), "scores": scores, "labels": torch.tensor(labels)})
    return outputs


def _pycocotools_map(annotations, outputs) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    category = {1: 3, 2: 7, 3: 11}
    results = []
    for (image_id, *_), out in zip(COCO_VAL, outputs):
        for box, score, label in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
            if label in category:
                x1, y1, x2, y2 = box
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": category[label],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": score,
                    }
                )  # noqa: E501
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0]) * 100


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_map_equals_pycocotools_on_the_original_file(coco, seed):
    m = load_manifest(DET, sets=coco_sets(coco, "data.workers=0"))
    task = get_task("detection")
    _, val, gt = task.datasets(m)
    ours = task.evaluate(ScriptedDetector(_predictions(seed)), m, val, gt, progress=False)
    reference = _pycocotools_map(gt.annotations, _predictions(seed))
    assert math.isfinite(ours["mAP"]) and ours["mAP"] == pytest.approx(reference, abs=1e-6)
    if seed == 0:
        assert ours["mAP"] == pytest.approx(100.0)  # the ground truth itself (the crowd box is COCOeval's business)


# ------------------------------------------------------------------------------------------ segmentation kinds
def test_cityscapes_maps_label_ids_to_train_ids_and_crops(cityscapes):
    m = load_manifest(SEG, sets=cityscapes_sets(cityscapes))
    train, val, _ = get_task("segmentation").datasets(m)
    assert len(train) == 4 and len(val) == 3
    torch.manual_seed(0)
    for i in range(len(train)):
        image, mask = train[i]
        assert image.dtype == torch.float32 and tuple(image.shape) == (3, 64, 64)
        assert mask.dtype == torch.int64 and tuple(mask.shape) == (64, 64)
        assert set(mask.unique().tolist()) <= set(CITYSCAPES_IDS.values())
    # validation: whole images, the official train ids, in sorted file order
    names = sorted((cityscapes / "gtFine" / "val").glob("*/*_labelIds.png"))
    table = np.full(256, 255)
    for label_id, train_id in CITYSCAPES_IDS.items():
        table[label_id] = train_id
    for i, path in enumerate(names):
        image, mask = val[i]
        assert tuple(image.shape) == (3, 64, 128)
        assert torch.equal(mask, torch.from_numpy(table[np.array(Image.open(path))]))
    assert load_manifest(SEG, sets=cityscapes_sets(cityscapes, "data.limit_val=1")).data.limit_val == 1
    _, val, _ = get_task("segmentation").datasets(
        load_manifest(SEG, sets=cityscapes_sets(cityscapes, "data.limit_val=1"))
    )
    assert len(val) == 1


def test_crops_larger_than_the_scaled_image_are_padded_bottom_right(cityscapes):
    sets = cityscapes_sets(cityscapes, "data.crop_size=[96, 96]", "data.scale_range=[0.5, 0.5]")
    train, _, _ = get_task("segmentation").datasets(load_manifest(SEG, sets=sets))
    fill = torch.tensor(MEAN_FILL, dtype=torch.float32)[:, None, None] / 255
    flips = set()
    torch.manual_seed(0)
    for _ in range(3):
        for i in range(len(train)):
            image, mask = train[i]  # 32 x 64 after the scale: 64 rows of padding below, 32 columns right (then flip)
            assert tuple(image.shape) == (3, 96, 96) and bool((mask[32:] == 255).all())
            assert torch.allclose(image[:, 32:], fill.expand(3, 64, 96))
            flipped = bool((mask[:32, :32] == 255).all())
            pad = slice(0, 32) if flipped else slice(64, 96)
            assert bool((mask[:, pad] == 255).all()) and torch.allclose(image[:, :, pad], fill.expand(3, 96, 32))
            flips.add(flipped)
    assert flips == {True, False}  # the flip happens about half of the time


def test_folder_reads_class_indices_and_keeps_255(folder, tmp_path):
    m = load_manifest(SEG, sets=folder_sets(folder))
    task = get_task("segmentation")
    train, val, _ = task.datasets(m)
    assert len(train) == 3 and len(val) == 2
    torch.manual_seed(0)
    for i in range(len(train)):
        image, mask = train[i]
        assert tuple(image.shape) == (3, 64, 64) and tuple(mask.shape) == (64, 64)
        assert set(mask.unique().tolist()) <= {0, 1, 2, 255}
    for i, (_, _, _, width, height) in enumerate(x for x in FOLDER_IMAGES if x[0] == "val"):
        image, mask = val[i]
        assert tuple(image.shape) == (3, height, width)
        assert torch.equal(mask, torch.from_numpy(folder_mask(width, height).astype(np.int64)))
    # whole validation images of different sizes: the collate pads (images with the mean, masks with 255)
    images, masks = task.collate([val[0], val[1]])
    assert tuple(images.shape) == (2, 3, 56, 48) and bool((masks[0, 32:] == 255).all())
    assert tuple(task.image_tensor([val[0][0], val[1][0]]).shape) == (2, 3, 56, 48)
    # a mask value that is neither a class nor 255 names its file
    root = shutil.copytree(folder, tmp_path / "folder")
    Image.fromarray(np.full((40, 48), 7, dtype=np.uint8)).save(root / "masks" / "train" / "a.png")
    train, _, _ = task.datasets(load_manifest(SEG, sets=folder_sets(root)))
    with pytest.raises(ValueError, match=r"masks/train/a.png: mask values \[7\] are neither a class index nor 255"):
        train[0]


def test_segmentation_metric_counts_the_kinds_classes(folder, monkeypatch):
    m = load_manifest(SEG, sets=folder_sets(folder, "data.workers=0"))
    task = get_task("segmentation")
    _, val, _ = task.datasets(m)

    class Oracle(nn.Module):  # logits that are the labels of the loader's images, in order
        def __init__(self):
            super().__init__()
            self.masks = [val[i][1] for i in range(len(val))]

        def forward(self, x):
            mask = self.masks.pop(0).clamp(max=len(FOLDER_CLASSES) - 1)
            return {"out": torch.nn.functional.one_hot(mask, len(FOLDER_CLASSES)).permute(2, 0, 1)[None].float()}

    monkeypatch.setattr(segmentation, "segmenter_forward", lambda model, x: (model(x)["out"], {}))
    metrics = task.evaluate(Oracle(), m, val, None, progress=False)
    assert metrics["mIoU"] == pytest.approx(100.0) and sorted(metrics) == ["IoU_0", "IoU_1", "IoU_2", "mIoU"]


def test_every_data_kind_is_in_the_code_fingerprint():
    roots = stage_roots("teacher", "detection")
    assert {
        "experiments/datasets/coco.py",
        "experiments/datasets/cityscapes.py",
        "experiments/datasets/folder.py",
    } <= set(roots)


# ------------------------------------------------------------------------------------------ end to end
SHORT = [
    "teacher_train.iterations=3",
    "teacher_train.warmup_iters=1",
    "student_train.iterations=4",  # > the smoke manifests' maskd.custom_mask_warmup
    "student_train.warmup_iters=1",
    "teacher_train.batch_size=2",
    "student_train.batch_size=2",
]


def _run_end_to_end(name, sets, tmp_path, capsys) -> float:
    argv = ["run", name, "--methods", "baseline", "--seeds", "0"]
    for text in [*sets, *SHORT]:
        argv += ["--set", text]
    rc = main([*argv, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-progress"])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, captured.err
    values = re.findall(r"^baseline/s0\s+\S+\s+(\S+)", out, flags=re.M)
    assert values, out
    return float(values[0])


def test_coco_runs_end_to_end(coco, tmp_path, capsys):
    assert math.isfinite(_run_end_to_end(DET, coco_sets(coco, "data.workers=0"), tmp_path, capsys))


def test_cityscapes_runs_end_to_end(cityscapes, tmp_path, capsys):
    assert math.isfinite(_run_end_to_end(SEG, cityscapes_sets(cityscapes, "data.workers=0"), tmp_path, capsys))


def test_folder_runs_end_to_end(folder, tmp_path, capsys):
    assert math.isfinite(_run_end_to_end(SEG, folder_sets(folder, "data.workers=0"), tmp_path, capsys))
