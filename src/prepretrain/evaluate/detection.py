"""Box and mask AP with the official tools: pycocotools (COCO) and the LVIS API (federated).

Why the official tools and not a re-implementation: AP depends on details (101-point
interpolation, area ranges, crowd matching, LVIS's federated rules) that only the reference
code gets exactly right, and papers report those numbers. Results are in percent.

``detections`` are COCO results: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``
plus ``"segmentation"`` (compressed RLE) for masks. Crowd regions of the ground truth are
ignored by pycocotools (a detection inside one is neither a true nor a false positive). LVIS:
a detection of a category that an image neither contains nor lists in ``neg_category_ids`` is
not counted; categories in ``not_exhaustive_category_ids`` only count their matches.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

KEYS = ("ap", "ap50", "ap75")


def _percent(value: float) -> float:
    """A tool's AP (a fraction; -1 when undefined) in percent (NaN when undefined)."""
    value = float(value)
    return value * 100.0 if value >= 0 else math.nan


def coco_ap(annotations: str | Path | dict[str, Any], detections: list[dict[str, Any]], iou_type: str = "bbox",
            max_detections: int = 100) -> dict[str, float]:
    """pycocotools COCOeval: ``{"ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"}`` in percent."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        ground_truth = COCO()
        ground_truth.dataset = _load(annotations)
        ground_truth.createIndex()
        if not detections:
            return {key: 0.0 for key in (*KEYS, "ap_small", "ap_medium", "ap_large")}
        results = ground_truth.loadRes(copy.deepcopy(detections))
        evaluation = COCOeval(ground_truth, results, iou_type)
        evaluation.params.maxDets = [1, 10, max_detections]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = evaluation.stats
    return {"ap": _percent(stats[0]), "ap50": _percent(stats[1]), "ap75": _percent(stats[2]),
            "ap_small": _percent(stats[3]), "ap_medium": _percent(stats[4]), "ap_large": _percent(stats[5])}


@contextlib.contextmanager
def _numpy_float_alias():
    """lvis-api 0.5.3 calls ``np.float``, which NumPy 1.24 removed: alias it while LVISEval runs."""
    had = hasattr(np, "float")
    if not had:
        np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if not had:
            del np.float  # type: ignore[attr-defined]


def lvis_ap(annotations: str | Path | dict[str, Any], detections: list[dict[str, Any]], iou_type: str = "bbox",
            max_detections: int = 300) -> dict[str, float]:
    """The LVIS API's federated evaluation: ``{"ap", "ap50", "ap75", "apr", "apc", "apf"}`` in percent."""
    try:
        from lvis import LVIS, LVISEval, LVISResults
    except ImportError:
        raise ImportError("LVIS evaluation needs the lvis package: pip install 'prepretrain[lvis]'") from None
    if not detections:
        return {key: 0.0 for key in (*KEYS, "apr", "apc", "apf")}
    ground_truth = LVIS.__new__(LVIS)  # LVIS() only takes a path: fill it from memory the same way
    import logging

    ground_truth.logger = logging.getLogger("lvis")
    ground_truth.dataset = _load(annotations)
    ground_truth._create_index()
    results = copy.deepcopy(detections)
    if iou_type == "segm":
        for result in results:
            result.pop("bbox", None)  # LVISResults would take the box area instead of the mask's
    with contextlib.redirect_stdout(io.StringIO()), _numpy_float_alias():
        evaluation = LVISEval(ground_truth, LVISResults(ground_truth, results, max_dets=max_detections), iou_type)
        evaluation.run()
    found = evaluation.get_results()
    return {"ap": _percent(found["AP"]), "ap50": _percent(found["AP50"]), "ap75": _percent(found["AP75"]),
            "apr": _percent(found["APr"]), "apc": _percent(found["APc"]), "apf": _percent(found["APf"])}


def _load(annotations: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(annotations, dict):
        return copy.deepcopy(annotations)
    with open(annotations, encoding="utf-8") as handle:
        return json.load(handle)


def detection_metrics(annotations: str | Path | dict[str, Any], detections: list[dict[str, Any]], *,
                      masks: bool = True, lvis: bool = False, max_detections: int = 100) -> dict[str, float]:
    """``box_ap``, ``box_ap50``, ``box_ap75`` (and ``mask_*`` with masks; ``*_apr/apc/apf`` for LVIS), percent."""
    evaluate = lvis_ap if lvis else coco_ap
    metrics: dict[str, float] = {}
    for prefix, iou_type in (("box", "bbox"), ("mask", "segm")):
        if iou_type == "segm" and not masks:
            continue
        found = evaluate(annotations, detections, iou_type, max_detections)
        metrics.update({f"{prefix}_{key}": value for key, value in found.items()})
    return metrics
