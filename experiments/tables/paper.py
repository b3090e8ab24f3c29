"""The paper's numbers for the settings the embedded benchmark stands in for, with their sources.

Every value is copied from the team's ``shared/paper_tables.md`` (which names its sources in turn); gains are
``method - baseline`` computed from those numbers. ``None`` means no published number was found for that setting.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperRow:
    value: float | None  # absolute metric of the method in the paper's setting
    gain: float | None  # value - baseline, in the same setting
    source: str


#: paper setting (the teacher's architecture) -> method -> the number the corresponding paper row reports.
PAPER: dict[str, dict[str, PaperRow]] = {
    "fcos": {
        # FCOS R101 (40.8) -> FCOS R50 (38.5), COCO val2017 box mAP, 2x schedule.
        "teacher": PaperRow(40.8, None, "MasKD README (ICLR): FCOS-R101 teacher"),
        "baseline": PaperRow(38.5, 0.0, "MasKD README (ICLR): FCOS-R50 baseline"),
        "fitnet": PaperRow(None, None, "not found"),
        "cwd": PaperRow(None, None, "not found"),
        "fgd": PaperRow(42.7, 4.2, "FGD README: FCOS-R101 -> FCOS-R50"),
        "maskd": PaperRow(42.9, 4.4, "MasKD README (ICLR): fcos_r101-fcos_r50"),
    },
    "retinanet": {
        # RetinaNet R101 (38.9) -> RetinaNet R50 (37.4), COCO val2017 box mAP, 2x schedule.
        "teacher": PaperRow(38.9, None, "MasKD README (ICLR): RetinaNet-R101 teacher"),
        "baseline": PaperRow(37.4, 0.0, "MasKD README (ICLR): RetinaNet-R50 2x baseline"),
        "fitnet": PaperRow(37.4, 0.0, "MasKD paper intro footnote: FitNet 'no gain on RetinaNet-R50'"),
        "cwd": PaperRow(40.5, 3.1, "CWD-MMDD, X101 teacher (not MasKD's R101 setting)"),
        "fgd": PaperRow(40.7, 3.3, "FGD README, X101 teacher (not MasKD's R101 setting)"),
        "maskd": PaperRow(39.9, 2.5, "MasKD README (ICLR): retinanet_r101-retinanet_r50"),
    },
    "deeplabv3": {
        # DeepLabV3 R101 (78.07) -> DeepLabV3 R18 (74.21), Cityscapes val mIoU, 40k iterations.
        "teacher": PaperRow(78.07, None, "MasKD segmentation README / CIRKD: DeepLabV3-R101"),
        "baseline": PaperRow(74.21, 0.0, "CIRKD README: DeepLabV3-R18 baseline"),
        "fitnet": PaperRow(None, None, "not found"),
        "cwd": PaperRow(75.55, 1.34, "CIRKD README (CWD in the CIRKD/MasKD setting)"),
        "maskd": PaperRow(77.00, 2.79, "MasKD segmentation README"),
    },
}
