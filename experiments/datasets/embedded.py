"""``embedded``: the generated scenes of real MNIST digits (:mod:`experiments.engine.data`), the default kind.

The ``[data]`` section is :class:`~experiments.engine.data.SceneConfig`; the data sets are exactly the ones the
tasks built before data kinds existed (same files, same order, no random transforms).
"""

from __future__ import annotations

from ..engine import data as scenes
from .registry import DataKind, register


class Embedded(DataKind):
    name = "embedded"
    config = scenes.SceneConfig
    tasks = frozenset({"detection", "segmentation"})
    random_transforms = False
    eval_batch_size = 16

    def num_classes(self, cfg, task):
        return scenes.DET_MODEL_NUM_CLASSES if task == "detection" else scenes.NUM_SEG_CLASSES

    def datasets(self, cfg, task):
        root = scenes.generate_scenes(cfg, progress=True)
        if task == "detection":
            return (
                scenes.detection_dataset(root, "train"),
                scenes.detection_dataset(root, "val"),
                root / "annotations" / "instances_val.json",
            )
        return scenes.segmentation_dataset(root, "train"), scenes.segmentation_dataset(root, "val"), root

    def has_test_split(self, cfg):
        return cfg.num_test > 0

    def test_set(self, cfg, task):
        if cfg.num_test == 0:
            return None
        root = scenes.generate_scenes(cfg, progress=True)
        if task == "detection":
            return scenes.detection_dataset(root, "test"), root / "annotations" / "instances_test.json"
        return scenes.segmentation_dataset(root, "test"), root

    def stride_keys(self, cfg):
        return {"data.image_size": cfg.image_size}

    def describe(self, cfg):
        test = f" / {cfg.num_test} test" if cfg.num_test else ""
        return f"{cfg.num_train} train / {cfg.num_val} val{test} scenes of {cfg.image_size} px"


KIND = register(Embedded())
