"""Detection transfer: ViTDet backbone equivalences and shapes, data, COCO/LVIS evaluation, the stage."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from prepretrain import files
from prepretrain.cli import main
from prepretrain.config import ConfigError, build_config
from prepretrain.data.detection import (
    CocoDetectionSource,
    DetectionSample,
    LargeScaleJitter,
    annotation_mask,
    category_image_counts,
    decode_target,
    draw_synthetic_image,
    is_lvis,
    mask_to_rle,
    repeat_factors,
    synthetic_coco,
)
from prepretrain.data.synthetic.images import SHAPES, _make_object, _paint_object, draw_object_scene
from prepretrain.evaluate.detection import coco_ap, detection_metrics, lvis_ap
from prepretrain.models.detector import (
    AgnosticBoxPredictor,
    CascadeRoIHeads,
    CrowdAwareRoIHeads,
    CrowdAwareRPN,
    _ignore_in_crowds,
    _scale_gradient,
    federated_classes,
    inside_fraction,
    sigmoid_classification_loss,
)
from prepretrain.models.mae import create_mae
from prepretrain.models.resolve import encoder_metadata
from prepretrain.models.vit import create_vit
from prepretrain.models.vitdet import (
    ViTDetBackbone,
    ViTDetBlock,
    default_global_blocks,
    parse_global_blocks,
    window_partition,
    window_unpartition,
)
from prepretrain.stages.detect import DetectConfig, DetectStage
from prepretrain.stages.mae import MAEConfig, MAEStage
from prepretrain.train.engine import train
from prepretrain.train.optim import build_optimizer, set_lr
from prepretrain.train.run import Run

# The smallest settings that still run every part: 32 px images, 3 pyramid levels, few proposals.
TINY = dict(image_size=32, num_images=16, synthetic_val_images=8, batch_size=4, steps=2, warmup_steps=0,
            pyramid_channels=16, head_dim=32, box_batch_per_image=16, rpn_batch_per_image=32, window_size=4,
            rpn_pre_nms_topk="50,50", rpn_post_nms_topk="20,20", eval_batch_size=8, progress=False,
            tensorboard=False, log_every=1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mae_run")
    cfg = build_config(MAEConfig, None, dict(out_dir=str(out), num_images=32, steps=1, batch_size=16,
                                             eval_images=8, progress=False, tensorboard=False))
    train(MAEStage(cfg))
    return out


def _stage(tmp_path: Path, **overrides) -> DetectStage:
    values = {**TINY, "out_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), **overrides}
    return DetectStage(build_config(DetectConfig, None, values))


# ------------------------------------------------------------------------------ backbone


def test_window_attention_equals_global_attention_when_the_window_covers_the_map():
    torch.manual_seed(0)
    encoder = create_vit("vit_micro4", img_size=32)  # 8x8 token map
    windowed = ViTDetBackbone(encoder, window_size=8, global_blocks=[], out_channels=16)
    global_ = ViTDetBackbone(encoder, window_size=8, global_blocks=list(range(6)), out_channels=16)
    global_.load_state_dict(windowed.state_dict())
    assert all(b.window_size == 8 for b in windowed.blocks) and all(b.window_size == 0 for b in global_.blocks)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = windowed.features(images), global_.features(images)
        smaller = ViTDetBackbone(encoder, window_size=4, global_blocks=[], out_channels=16).features(images)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (smaller - b).abs().max() > 1e-3  # 4x4 windows do change the result


def test_global_block_computes_what_the_timm_block_computes():
    torch.manual_seed(0)
    encoder = create_vit("vit_micro4", img_size=32)
    block = encoder.blocks[0].eval()
    tokens = torch.randn(2, 64, 128)
    with torch.no_grad():
        expected = block(tokens)
        ours = ViTDetBlock(block, window_size=0).eval()(tokens.view(2, 8, 8, 128)).reshape(2, 64, 128)
        with_rel = ViTDetBlock(block, window_size=0, rel_pos_size=8).eval()(tokens.view(2, 8, 8, 128))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_rel.reshape(2, 64, 128), expected, rtol=1e-5, atol=1e-5)  # zero-init biases


def test_window_partition_pads_and_round_trips():
    x = torch.randn(2, 10, 7, 3)
    windows, padded = window_partition(x, 4)
    assert padded == (12, 8) and windows.shape == (2 * 3 * 2, 16, 3)
    assert torch.equal(window_unpartition(windows, 4, padded, (10, 7)), x)
    assert torch.equal(windows[0].view(4, 4, 3), x[0, :4, :4])  # the first window is the top-left 4x4 block


def test_global_blocks_follow_vitdet():
    assert default_global_blocks(12) == [2, 5, 8, 11]
    assert default_global_blocks(24) == [5, 11, 17, 23]
    assert default_global_blocks(32) == [7, 15, 23, 31]
    assert parse_global_blocks("1, 3", 6) == [1, 3] and parse_global_blocks("none", 6) == []
    with pytest.raises(ValueError, match="outside"):
        parse_global_blocks("7", 6)


def test_feature_pyramid_at_1024_px_matches_vitdet_for_vit_b16():
    encoder = create_vit("vit_b16", img_size=1024, device="meta")  # shapes only: no memory, no compute
    backbone = ViTDetBackbone(encoder, 14, default_global_blocks(12), rel_pos=True).to("meta")
    assert backbone.pos_embed.shape == (1, 64, 64, 768)
    assert [b.window_size for b in backbone.blocks] == [14, 14, 0, 14, 14, 0, 14, 14, 0, 14, 14, 0]
    assert backbone.blocks[0].rel_pos_h.shape == (27, 64) and backbone.blocks[2].rel_pos_h.shape == (127, 64)
    levels = backbone(torch.empty(1, 3, 1024, 1024, device="meta"))
    shapes = {name: tuple(level.shape) for name, level in levels.items()}
    assert shapes == {"0": (1, 256, 256, 256), "1": (1, 256, 128, 128), "2": (1, 256, 64, 64),
                      "3": (1, 256, 32, 32), "pool": (1, 256, 16, 16)}
    assert backbone.strides == [4.0, 8.0, 16.0, 32.0, 64.0]


def test_position_embedding_is_interpolated_without_the_class_token():
    torch.manual_seed(0)
    encoder = create_vit("vit_micro4", img_size=32)
    backbone = ViTDetBackbone(encoder, window_size=4, out_channels=16)
    grid = encoder.pos_embed.detach()[:, 1:].reshape(1, 8, 8, 128)
    assert torch.equal(backbone.pos_embed.detach(), grid)
    expected = F.interpolate(grid.permute(0, 3, 1, 2), size=(12, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(backbone.position_embedding(12, 16), expected.permute(0, 2, 3, 1))
    assert backbone(torch.randn(1, 3, 48, 64))["2"].shape == (1, 16, 12, 16)  # any size, padded windows


def test_feature_norm_makes_the_pyramid_blind_to_per_channel_offsets_and_scales():
    """An MAE map is large and dominated by a per-channel offset shared by all tokens; with
    feature_norm=batch the pyramid sees the same input whatever those offsets and scales are."""
    torch.manual_seed(0)
    encoder = create_vit("vit_micro4", img_size=32)
    assert isinstance(ViTDetBackbone(encoder, window_size=4, out_channels=16).feature_norm, torch.nn.Identity)
    backbone = ViTDetBackbone(encoder, window_size=4, out_channels=16, feature_norm="batch").train()
    assert isinstance(backbone.feature_norm, torch.nn.BatchNorm2d) and not backbone.feature_norm.affine
    assert not [name for name, _ in backbone.feature_norm.named_parameters()]  # nothing to decay or train
    with torch.no_grad():
        features = backbone.features(torch.randn(4, 3, 32, 32))
        scale, offset = torch.rand(1, 128, 1, 1) * 10 + 0.5, torch.randn(1, 128, 1, 1) * 20
        plain = backbone.pyramid(backbone.feature_norm(features))
        shifted = backbone.pyramid(backbone.feature_norm(features * scale + offset))
    for name in plain:
        torch.testing.assert_close(shifted[name], plain[name], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="feature_norm"):
        ViTDetBackbone(encoder, feature_norm="layer")


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    backbone = ViTDetBackbone(create_vit("vit_micro4", img_size=32), window_size=4, out_channels=16).train()
    images = torch.randn(2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        backbone.set_grad_checkpointing(enable)
        backbone.zero_grad()
        backbone.features(images).square().mean().backward()
        grads.append(backbone.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


# ---------------------------------------------------------------------------------- data


@pytest.mark.parametrize("style", ["shapes", "objects"])
def test_synthetic_set_is_real_coco_json_and_deterministic(tmp_path, style):
    annotations, images = synthetic_coco(tmp_path, "val", 6, 48, style=style)
    dataset = json.loads(annotations.read_text())
    expected = ["rectangle", "ellipse", "triangle"] if style == "shapes" else SHAPES
    assert [c["name"] for c in dataset["categories"]] == expected
    assert len(dataset["images"]) == 6 and len(dataset["annotations"]) >= 6 and not is_lvis(dataset)
    for annotation in dataset["annotations"]:
        mask = annotation_mask(annotation["segmentation"], 48, 48)
        ys, xs = np.nonzero(mask)
        assert annotation["area"] == mask.sum() > 0
        assert annotation["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
    pixels, instances = draw_synthetic_image(0, "val", 3, 48, style)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(images / "000003.png")), pixels)
    masks = np.stack([i["mask"] for i in instances])
    assert masks.sum(0).max() == 1  # visible parts never overlap: occluded pixels belong to the top shape
    before = annotations.stat().st_mtime_ns
    assert synthetic_coco(tmp_path, "val", 6, 48, style=style)[0].stat().st_mtime_ns == before  # reused
    assert (style == "objects") == ("objects" in annotations.parent.parent.name)  # each style has its own folder


def test_object_scenes_mask_what_was_painted():
    """In the objects style an object's mask is where it is painted with at least half opacity."""
    obj = _make_object(1, 0, 0, 8.0, 20.0, 20.0, np.full(7, 0.5))  # a solid red square
    canvas = np.zeros((40, 40, 3), dtype=np.float32)
    coverage = _paint_object(canvas, obj)
    alpha = canvas[..., 0] / obj.rgb[0]
    assert 50 < coverage.sum() < 400 and np.array_equal(coverage, alpha >= 0.5 - 1e-6)
    rng = np.random.default_rng(3)
    image, shapes = draw_object_scene(rng, 64, 4)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and len(shapes) == 4
    assert all(0 <= kind < len(SHAPES) and mask.shape == (64, 64) and mask.any() for kind, mask in shapes)
    instances = draw_synthetic_image(0, "train", 5, 64, "objects")[1]
    assert all(0 <= i["category"] < len(SHAPES) for i in instances) and instances
    with pytest.raises(ValueError, match="style"):
        draw_synthetic_image(0, "train", 5, 64, "photos")


def test_polygon_and_rle_segmentations_decode():
    square = annotation_mask([[2, 2, 6, 2, 6, 6, 2, 6]], 10, 10)
    assert square.sum() == 16 and square[2:6, 2:6].all()
    rle = mask_to_rle(square)
    assert np.array_equal(annotation_mask(rle, 10, 10), square)
    from pycocotools import mask as mask_utils

    uncompressed = {"size": [10, 10], "counts": [22, 4, 6, 4, 6, 4, 6, 4, 44]}  # column-major run lengths
    assert annotation_mask(uncompressed, 10, 10).sum() == 16
    assert mask_utils.area(mask_utils.frPyObjects(uncompressed, 10, 10)) == 16


def test_repeat_factor_sampling_draws_images_of_rare_categories_more_often(tmp_path):
    # 100 images: category 1 in all of them, category 2 in 10, category 3 in 1 (and as a crowd in 50).
    images = [{"id": i, "file_name": f"{i}.png", "height": 8, "width": 8} for i in range(1, 101)]
    annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 4, 4], "iscrowd": 0}
                   for i in range(1, 101)]
    annotations += [{"id": 200 + i, "image_id": i, "category_id": 2, "bbox": [0, 0, 4, 4], "iscrowd": 0}
                    for i in range(1, 11)]
    annotations += [{"id": 300, "image_id": 100, "category_id": 3, "bbox": [0, 0, 4, 4], "iscrowd": 0}]
    annotations += [{"id": 400 + i, "image_id": i, "category_id": 3, "bbox": [0, 0, 4, 4], "iscrowd": 1}
                    for i in range(20, 70)]
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}))
    source = CocoDetectionSource(path, tmp_path, train=True)
    factors = repeat_factors(source, 0.1)  # f = 1, 0.1, 0.01: r_c = 1, 1, sqrt(10)
    assert factors.shape == (100,) and factors[10:99].eq(1).all() and factors[:10].eq(1).all()
    assert factors[99] == pytest.approx(10**0.5)  # the image with the rare category takes its factor
    factors = repeat_factors(source, 0.4)  # r_c = 1, 2, sqrt(40): an image takes its rarest category's
    assert factors[0] == pytest.approx(2.0) and factors[50] == 1.0 and factors[99] == pytest.approx(40**0.5)
    assert repeat_factors(source, 0.0).eq(1).all()
    # In the stage: per-sample weights with an epoch of sum(r) draws, so an image is drawn r times per epoch.
    synthetic = _stage(tmp_path)
    assert synthetic.train_data(Run.of_stage(synthetic)).weights is None  # off by default
    stage = _stage(tmp_path, repeat_factor_threshold=0.4, train_annotations=str(path), train_images=str(tmp_path),
                   val_annotations=str(path), val_images=str(tmp_path))
    data = stage.train_data(Run.of_stage(stage))
    assert torch.equal(data.weights, factors) and data.epoch_size == round(float(factors.sum())) == 115
    from prepretrain.data.loader import SampleStream

    stream = SampleStream(data.num_samples, 8, weights=data.weights, epoch_size=data.epoch_size)
    draws = torch.cat([stream.order(epoch) for epoch in range(200)])
    counts = torch.bincount(draws, minlength=100).double() / 200
    assert counts[:10].mean() == pytest.approx(2.0, rel=0.1) and counts[10:99].mean() == pytest.approx(1.0, rel=0.05)


def _sample_with_crowd() -> DetectionSample:
    from PIL import Image

    image = Image.new("RGB", (40, 20), (200, 10, 10))
    annotations = [
        {"id": 1, "category_id": 7, "bbox": [0, 0, 10, 10], "iscrowd": 0,
         "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]},
        {"id": 2, "category_id": 9, "bbox": [20, 0, 20, 20], "iscrowd": 1,
         "segmentation": mask_to_rle(np.pad(np.ones((20, 20), np.uint8), ((0, 0), (20, 0))))},
    ]
    return DetectionSample("x", 1, image, annotations)


def test_large_scale_jitter_keeps_boxes_masks_and_crowds_consistent():
    lsj = LargeScaleJitter(64, {7: 1, 9: 2}, lsj_min=1.6, lsj_max=1.6, flip=1.0)  # 40x20 -> 102x51: cropped
    random.seed(3)
    sample = lsj(_sample_with_crowd())
    target, (height, width) = decode_target(sample["target"])
    assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.uint8
    assert (height, width) == (51, 64)  # fits a 1.6 x 64 square, then cropped to at most 64 x 64
    assert target["labels"].tolist() in ([1], [])  # the crowd is never a positive
    for box, mask in zip(target["boxes"], target["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    assert len(target["crowd_boxes"]) == 1
    small = LargeScaleJitter(64, {7: 1, 9: 2}, lsj_min=0.5, lsj_max=0.5, flip=0.0)(_sample_with_crowd())
    target, size = decode_target(small["target"])
    assert size == (16, 32) and target["boxes"].tolist() == [[0.0, 0.0, 8.0, 8.0]]
    assert target["crowd_boxes"].tolist() == [[16.0, 0.0, 32.0, 16.0]]
    padding = small["image"][:, 16:, :].float()
    assert torch.equal(padding[:, 0, 0], torch.tensor([124.0, 116.0, 104.0]))  # the mean pixel: 0 once normalised


def test_crowd_regions_are_ignored_not_negatives_in_training():
    crowd = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = torch.tensor([[1.0, 1.0, 5.0, 5.0], [8.0, 8.0, 16.0, 16.0], [20.0, 20.0, 30.0, 30.0], [2.0, 2, 6, 6]])
    assert inside_fraction(crowd, boxes).tolist() == pytest.approx([1.0, 4 / 64, 0.0, 1.0])
    labels = torch.tensor([0, 0, 0, 1])
    assert _ignore_in_crowds(labels, boxes, crowd).tolist() == [-1, 0, 0, 1]  # a positive stays positive
    assert _ignore_in_crowds(labels, boxes, None).tolist() == [0, 0, 0, 1]


# ------------------------------------------------------------------------------- cascade


def _roi_heads(score_thresh: float = 0.05, nms_thresh: float = 0.5) -> CrowdAwareRoIHeads:
    """Mask R-CNN RoI heads over 16-channel maps, with a class-agnostic box predictor (3 classes + background)."""
    return CrowdAwareRoIHeads(
        MultiScaleRoIAlign(["0", "1"], 7, 0), TwoMLPHead(16 * 49, 32), AgnosticBoxPredictor(32, 4),
        0.5, 0.5, 16, 0.25, (10.0, 10.0, 5.0, 5.0), score_thresh, nms_thresh, 1000,
        mask_roi_pool=MultiScaleRoIAlign(["0", "1"], 14, 0), mask_head=MaskRCNNHeads(16, [16], 1),
        mask_predictor=MaskRCNNPredictor(16, 16, 4))


def _roi_inputs():
    generator = torch.Generator().manual_seed(0)
    features = {"0": torch.randn(2, 16, 16, 16, generator=generator),
                "1": torch.randn(2, 16, 8, 8, generator=generator)}
    corners = torch.rand(2, 30, 2, generator=generator) * 40
    sizes = torch.rand(2, 30, 2, generator=generator) * 20 + 4
    proposals = list(torch.cat([corners, corners + sizes], -1))
    targets = []
    for boxes in ([[4.0, 4.0, 30.0, 24.0], [30.0, 30.0, 60.0, 50.0]], [[10.0, 20.0, 40.0, 60.0]]):
        boxes = torch.tensor(boxes)
        masks = torch.zeros(len(boxes), 64, 64, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            mask[y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "labels": torch.arange(1, len(boxes) + 1), "masks": masks})
    return features, proposals, [(64, 64), (64, 64)], targets


def test_one_stage_cascade_is_mask_rcnn_with_class_agnostic_boxes():
    """The cascade's own training and inference paths, cut to one stage, compute what torchvision's
    RoI heads compute with the same modules: same losses (same sampling), same detections and masks."""
    torch.manual_seed(0)
    base = _roi_heads()
    cascade = CascadeRoIHeads(base, [base.box_head], [base.box_predictor], ious=(0.5,), box_weights=((10, 10, 5, 5),))
    features, proposals, shapes, targets = _roi_inputs()
    losses = []
    for heads in (base, cascade):
        torch.manual_seed(1)  # the same proposals sampled
        losses.append(heads.train()(features, [p.clone() for p in proposals], shapes, targets)[1])
    assert set(losses[1]) == {"loss_classifier_stage0", "loss_box_reg_stage0", "loss_mask"}
    for name in ("loss_classifier", "loss_box_reg", "loss_mask"):
        torch.testing.assert_close(losses[1][name if name == "loss_mask" else f"{name}_stage0"], losses[0][name])
    assert losses[0]["loss_box_reg"] > 0 and losses[0]["loss_mask"] > 0
    with torch.no_grad():
        expected, _ = base.eval()(features, proposals, shapes)
        found, _ = cascade.eval()(features, proposals, shapes)
    assert sum(len(r["boxes"]) for r in expected) > 10
    for a, b in zip(expected, found):
        assert torch.equal(a["labels"], b["labels"])
        for key in ("boxes", "scores", "masks"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)


def test_cascade_stages_label_at_rising_iou_with_their_own_box_coder():
    torch.manual_seed(0)
    base = _roi_heads()
    heads = CascadeRoIHeads(base, [TwoMLPHead(16 * 49, 32) for _ in range(3)],
                            [AgnosticBoxPredictor(32, 4) for _ in range(3)])
    gt = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([2]),
          "crowd_boxes": torch.tensor([[40.0, 40.0, 60.0, 60.0]])}
    proposals = [torch.tensor([[0.0, 0.0, 10.0, 5.5], [0.0, 0.0, 10.0, 6.5], [0.0, 0.0, 10.0, 7.5],
                               [0.0, 0.0, 2.0, 10.0], [42.0, 42.0, 50.0, 50.0]])]  # IoU .55 .65 .75 .2, in the crowd
    expected_labels = {0: [2, 2, 2, 0], 1: [0, 2, 2, 0], 2: [0, 0, 2, 0]}
    for stage, weights in enumerate(((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))):
        kept, matched, labels, regression = heads._label(stage, proposals, [gt])
        assert labels[0].tolist() == expected_labels[stage]  # the crowd proposal is ignored (dropped), not background
        assert torch.equal(kept[0], proposals[0][:4]) and matched[0].tolist() == [0, 0, 0, 0]
        # dy of the 10x7.5 box towards the 10x10 one: weight x (5 - 3.75) / 7.5
        assert regression[0][2, 1].item() == pytest.approx(weights[1] * 1.25 / 7.5)
        torch.testing.assert_close(regression[0], BoxCoder(weights).encode_single(gt["boxes"].expand(4, 4), kept[0]))
    assert heads.proposal_matcher is heads.stage_matchers[0] and heads._crowd == []  # nothing left switched


def test_cascade_trains_every_stage_and_averages_their_scores():
    torch.manual_seed(0)
    base = _roi_heads(score_thresh=0.0, nms_thresh=1.0)  # keep every (box, class) pair
    heads = CascadeRoIHeads(base, [TwoMLPHead(16 * 49, 32) for _ in range(3)],
                            [AgnosticBoxPredictor(32, 4) for _ in range(3)])
    features, proposals, shapes, targets = _roi_inputs()
    losses = heads.train()(features, proposals, shapes, targets)[1]
    assert len(losses) == 7 and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for stage in range(3):
        assert heads.stage_heads[stage].fc6.weight.grad.abs().sum() > 0
        assert heads.stage_predictors[stage].bbox_pred.weight.grad.abs().sum() > 0
    # With regressions switched off the boxes stay put, so each stage scores the same boxes:
    # the detections' scores are the per-stage class probabilities averaged.
    with torch.no_grad():
        for predictor in heads.stage_predictors:
            predictor.bbox_pred.weight.zero_()
            predictor.bbox_pred.bias.zero_()
        heads.eval()
        result, _ = heads(features, proposals, shapes)
        per_stage = torch.stack([heads._run_stage(k, features, proposals, shapes)[0].softmax(-1) for k in range(3)])
    first = len(proposals[0])
    expected = per_stage.mean(0)[:first, 1:].flatten().sort(descending=True).values
    torch.testing.assert_close(result[0]["scores"], expected, rtol=1e-5, atol=1e-6)
    stage0 = per_stage[0, :first, 1:].flatten().sort(descending=True).values
    assert (stage0 - expected).abs().max() > 1e-3  # the stages do disagree: the average is not one stage's
    x = torch.ones(3, requires_grad=True)
    y = _scale_gradient(x, 1 / 3)
    y.sum().backward()
    assert torch.equal(y, x) and torch.allclose(x.grad, torch.full((3,), 1 / 3))
    # each stage hands the backbone a third of its RoI features' gradient
    grads = []
    for scaled in (True, False):
        maps = {name: level.clone().requires_grad_() for name, level in features.items()}
        if scaled:
            logits = heads._run_stage(1, maps, proposals, shapes)[0]
        else:
            logits = heads.stage_predictors[1](heads.stage_heads[1](heads.box_roi_pool(maps, proposals, shapes)))[0]
        logits.square().sum().backward()
        grads.append(maps["0"].grad)
    assert grads[1].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1] / 3)


def test_federated_classes_keep_the_batch_classes_and_draw_negatives_by_weight():
    weights = torch.tensor([0.0, 1.0, 0.0, 4.0, 9.0, 1.0, 0.0])  # labels 2 and 6 are never drawn
    labels = torch.tensor([0, 0, 5, 5, 1])
    torch.manual_seed(0)
    draws = [federated_classes(labels, weights, count=3) for _ in range(400)]
    assert all(sorted(d[:2].tolist()) == [1, 5] and len(d) == 3 for d in draws)  # present first, then one drawn
    drawn = torch.stack([d[2] for d in draws])
    assert set(drawn.tolist()) <= {3, 4}  # weight 0 and the background are never drawn
    assert 0.55 < (drawn == 4).float().mean() < 0.8  # 9 : 4 -> 0.69
    # fewer classes with a weight than asked for: all of them
    assert sorted(federated_classes(labels, weights, count=50).tolist()) == [1, 3, 4, 5]


def test_sigmoid_classification_loss_counts_only_the_federated_classes():
    logits = torch.randn(4, 5)
    labels = torch.tensor([0, 2, 4, 2])
    target = torch.zeros(4, 4)
    target[1, 1] = target[2, 3] = target[3, 1] = 1.0  # label k is column k - 1: background is nobody's positive
    full = F.binary_cross_entropy_with_logits(logits[:, 1:], target, reduction="sum") / 4
    torch.testing.assert_close(sigmoid_classification_loss(logits, labels), full)
    subset = F.binary_cross_entropy_with_logits(logits[:, [2, 4]], target[:, [1, 3]], reduction="sum") / 4
    torch.testing.assert_close(sigmoid_classification_loss(logits, labels, torch.tensor([2, 4])), subset)


def test_federated_cascade_trains_and_scores_with_sigmoids(tmp_path):
    torch.manual_seed(0)
    base = _roi_heads(score_thresh=0.0, nms_thresh=1.0)
    heads = CascadeRoIHeads(base, [TwoMLPHead(16 * 49, 32) for _ in range(3)],
                            [AgnosticBoxPredictor(32, 4) for _ in range(3)],
                            fed_loss_weights=torch.tensor([0.0, 1.0, 1.0, 1.0]), fed_loss_classes=2)
    features, proposals, shapes, targets = _roi_inputs()
    torch.manual_seed(1)
    losses = heads.train()(features, proposals, shapes, targets)[1]
    torch.manual_seed(1)
    plain = CascadeRoIHeads(base, heads.stage_heads, heads.stage_predictors).train()(
        features, proposals, shapes, targets)[1]
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_classifier_stage0"] != plain["loss_classifier_stage0"]  # sigmoid, not softmax
    torch.testing.assert_close(losses["loss_box_reg_stage0"], plain["loss_box_reg_stage0"])  # same samples
    with torch.no_grad():
        for predictor in heads.stage_predictors:
            predictor.bbox_pred.weight.zero_()
            predictor.bbox_pred.bias.zero_()
        result, _ = heads.eval()(features, proposals, shapes)
        per_stage = torch.stack([heads._run_stage(k, features, proposals, shapes)[0].sigmoid() for k in range(3)])
    expected = per_stage.mean(0)[: len(proposals[0]), 1:].flatten().sort(descending=True).values
    torch.testing.assert_close(result[0]["scores"], expected, rtol=1e-5, atol=1e-6)
    # the stage builds the weights from the training images: image counts ** 0.5, background 0
    stage = _stage(tmp_path, cascade=True, fed_loss=True)
    counts = category_image_counts(stage.train_source)
    assert counts[0] == 0 and counts[1:].min() > 0 and counts.max() <= len(stage.train_source)
    model = stage.build_model(Run.of_stage(stage))
    torch.testing.assert_close(model.roi_heads.fed_loss_weights, counts.float() ** 0.5)


# ---------------------------------------------------------------------------- evaluation


def _coco_ground_truth() -> dict:
    square = [[10, 10, 30, 10, 30, 30, 10, 30]]
    return {
        "images": [{"id": 1, "height": 64, "width": 64, "file_name": "a.png"},
                   {"id": 2, "height": 64, "width": 64, "file_name": "b.png"}],
        "categories": [{"id": 3, "name": "a"}, {"id": 5, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0,
             "segmentation": square},
            {"id": 2, "image_id": 2, "category_id": 5, "bbox": [0, 0, 40, 24], "area": 960, "iscrowd": 0,
             "segmentation": [[0, 0, 40, 0, 40, 24, 0, 24]]},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [40, 40, 20, 20], "area": 400, "iscrowd": 1,
             "segmentation": mask_to_rle(np.pad(np.ones((20, 20), np.uint8), ((40, 4), (40, 4))))},
        ],
    }


def _perfect(ground_truth: dict) -> list[dict]:
    found = []
    for annotation in ground_truth["annotations"]:
        if annotation.get("iscrowd"):
            continue
        image = next(im for im in ground_truth["images"] if im["id"] == annotation["image_id"])
        mask = annotation_mask(annotation["segmentation"], image["height"], image["width"])
        found.append({"image_id": annotation["image_id"], "category_id": annotation["category_id"],
                      "bbox": annotation["bbox"], "score": 0.9, "segmentation": mask_to_rle(mask)})
    return found


def test_perfect_predictions_give_ap_100_and_crowd_regions_are_ignored():
    ground_truth = _coco_ground_truth()
    detections = _perfect(ground_truth)
    metrics = detection_metrics(ground_truth, detections)
    for key in ("box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50", "mask_ap75"):
        assert metrics[key] == pytest.approx(100.0), key
    inside_crowd = {"image_id": 2, "category_id": 3, "bbox": [42, 42, 15, 15], "score": 0.95}
    assert coco_ap(ground_truth, [*detections, inside_crowd])["ap"] == pytest.approx(100.0)
    not_crowd = json.loads(json.dumps(ground_truth))
    not_crowd["annotations"] = not_crowd["annotations"][:2]  # the same detection is now a false positive
    assert coco_ap(not_crowd, [*detections, inside_crowd])["ap"] < 90.0
    shifted = [{**d, "bbox": [d["bbox"][0] + 6, *d["bbox"][1:]]} for d in detections]
    assert coco_ap(ground_truth, shifted)["ap50"] < 100.0 or coco_ap(ground_truth, shifted)["ap75"] < 100.0
    assert coco_ap(ground_truth, [])["ap"] == 0.0


def _lvis_ground_truth() -> dict:
    """Image 1: category 3, negatives [8]; image 2: categories 5 and 8 (5 not exhaustively annotated);
    image 3: category 3, nothing verified absent."""
    def box(image_id, category, x, y, size, id_):
        return {"id": id_, "image_id": image_id, "category_id": category, "bbox": [x, y, size, size],
                "area": size * size, "segmentation": [[x, y, x + size, y, x + size, y + size, x, y + size]]}

    return {
        "images": [{"id": 1, "height": 64, "width": 64, "neg_category_ids": [8], "not_exhaustive_category_ids": []},
                   {"id": 2, "height": 64, "width": 64, "neg_category_ids": [], "not_exhaustive_category_ids": [5]},
                   {"id": 3, "height": 64, "width": 64, "neg_category_ids": [], "not_exhaustive_category_ids": []}],
        "categories": [{"id": 3, "name": "a", "frequency": "f"}, {"id": 5, "name": "b", "frequency": "r"},
                       {"id": 8, "name": "c", "frequency": "c"}],
        "annotations": [box(1, 3, 10, 10, 20, 1), box(2, 5, 0, 0, 24, 2), box(2, 8, 30, 30, 20, 3),
                        box(3, 3, 5, 5, 30, 4)],
    }


def test_lvis_federated_evaluation(tmp_path):
    ground_truth = _lvis_ground_truth()
    assert is_lvis(ground_truth)
    path = files.write_json(tmp_path / "lvis_val.json", ground_truth)
    detections = _perfect(ground_truth)
    metrics = detection_metrics(path, detections, lvis=True, max_detections=300)
    for key in ("box_ap", "box_ap50", "box_ap75", "box_apr", "box_apc", "box_apf", "mask_ap"):
        assert metrics[key] == pytest.approx(100.0), key
    extra = {"category_id": 8, "bbox": [40, 2, 12, 12], "score": 0.99}
    # Image 3 neither contains category 8 nor lists it as absent: a detection of it there is not judged ...
    assert lvis_ap(path, [*detections, {**extra, "image_id": 3}])["ap"] == pytest.approx(100.0)
    # ... image 1 lists it as verified absent: there the same detection is a false positive.
    assert lvis_ap(path, [*detections, {**extra, "image_id": 1}])["apc"] < 100.0
    # An unmatched detection of a category not exhaustively annotated in its image is not a false positive.
    unmatched = {"image_id": 2, "category_id": 5, "bbox": [40, 2, 12, 12], "score": 0.99}
    assert lvis_ap(path, [*detections, unmatched])["apr"] == pytest.approx(100.0)
    exhaustive = json.loads(json.dumps(ground_truth))
    exhaustive["images"][1]["not_exhaustive_category_ids"] = []
    strict = files.write_json(tmp_path / "lvis_exhaustive.json", exhaustive)
    assert lvis_ap(strict, [*detections, unmatched])["apr"] < 100.0


# --------------------------------------------------------------------------------- stage


def test_layer_decay_scales_backbone_blocks_and_leaves_heads_at_full_lr(tmp_path):
    stage = _stage(tmp_path, layer_decay=0.5)
    torch.manual_seed(0)
    model = stage.build_model(Run.of_stage(stage))
    groups = stage.param_groups(model)
    optimizer = build_optimizer(groups, 1.0, (0.9, 0.999), torch.device("cpu"))
    set_lr(optimizer, 1.0)
    lr_of = {name: built["lr"] for group, built in zip(groups, optimizer.param_groups) for name in group["names"]}
    assert lr_of["backbone.pos_embed"] == lr_of["backbone.patch_embed.proj.weight"] == pytest.approx(0.5**7)
    for block in range(6):
        assert lr_of[f"backbone.blocks.{block}.attn.qkv.weight"] == pytest.approx(0.5 ** (6 - block))
    pyramid = [name for name in lr_of if name.startswith("backbone.pyramid.")]
    heads = [name for name in lr_of if name.startswith(("rpn.", "roi_heads."))]
    assert pyramid and heads and all(lr_of[name] == 1.0 for name in pyramid + heads)
    assert isinstance(model.rpn, CrowdAwareRPN)


def _encoder_weights_in_backbone(stage: DetectStage, source: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(123)
    model = stage.build_model(Run.of_stage(stage))
    backbone = model.backbone
    for key in ("blocks.0.attn.qkv.weight", "blocks.5.mlp.fc2.bias", "patch_embed.proj.weight"):
        assert torch.equal(backbone.state_dict()[key], source[key]), key
    grid = source["pos_embed"][:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(backbone.pos_embed.detach(), expected)  # 32 px weights run at 64 px


def test_backbone_loads_mae_run_wsp_layout_and_official_checkpoints(tmp_path, mae_run):
    settings = dict(image_size=64, window_size=8)
    mae_encoder = load_file(str(mae_run / "encoder.safetensors"))
    _encoder_weights_in_backbone(_stage(tmp_path, encoder=str(mae_run), **settings), mae_encoder)
    # A WSP run directory holds the same layout: a timm encoder safetensors with metadata (+ the hashtag head).
    wsp_run = tmp_path / "wsp_run"
    torch.manual_seed(1)
    wsp_encoder = {k: v.contiguous() for k, v in create_vit("vit_micro4").state_dict().items()}
    files.save_safetensors(wsp_run / "encoder.safetensors", wsp_encoder, encoder_metadata("vit_micro4", 32))
    _encoder_weights_in_backbone(_stage(tmp_path, encoder=str(wsp_run), **settings), wsp_encoder)
    # The official MAE "full" checkpoint layout: {"model": encoder + decoder}, torch.save'd.
    torch.manual_seed(2)
    full = create_mae("vit_micro4", decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2).state_dict()
    official = tmp_path / "mae_pretrain_full.pth"
    torch.save({"model": full}, official)
    _encoder_weights_in_backbone(_stage(tmp_path, encoder=str(official), model="vit_micro4", **settings), full)


def test_backbone_from_an_mae_run_computes_the_mae_encoders_patch_tokens(tmp_path, mae_run):
    """At the MAE's resolution with global attention, the backbone's last-block map is the MAE
    encoder's own forward (no masking, no class token, before the final norm): patch embedding,
    position embedding, block order and loading all match, number for number."""
    stage = _stage(tmp_path, encoder=str(mae_run), image_size=32, window_size=0)
    torch.manual_seed(0)
    backbone = stage.build_model(Run.of_stage(stage)).backbone.eval()
    mae = create_mae("vit_micro4", decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4)
    mae.load_state_dict(load_file(str(mae_run / "mae_full.safetensors")), strict=True)
    mae.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = backbone.features(images).permute(0, 2, 3, 1).reshape(2, 64, -1)
        expected = mae._run(mae.blocks, mae.patch_embed(images) + mae.pos_embed[:, 1:])
        # The MAE's forward with nothing masked (noise in token order keeps the order), class token included:
        with_cls, mask, _ = mae.forward_encoder(images, 0.0, noise=torch.arange(64.0).expand(2, 64))
    assert mask.sum() == 0 and all(block.window_size == 0 for block in backbone.blocks)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # ViTDet drops the class token: the tokens differ from the MAE's (normed) ones only by its attention share.
    normed = F.layer_norm(ours, (ours.shape[-1],), mae.norm.weight, mae.norm.bias, eps=1e-6)
    assert (normed - with_cls[:, 1:]).norm() < 0.2 * with_cls[:, 1:].norm()


@pytest.mark.parametrize("heads", ["plain", "cascade", "cascade_fed_loss"])
def test_tiny_detect_command_writes_pycocotools_ap(tmp_path, heads):
    out = tmp_path / "det"
    cascade = heads != "plain"
    args = [f"{k}={v}" for k, v in TINY.items()] + [f"cascade={cascade}", f"fed_loss={heads == 'cascade_fed_loss'}"]
    assert main(["detect", f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}", *args]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["stage"] == "detect" and results["steps"] == 2 and results["num_classes"] == 3
    for key in ("box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50", "mask_ap75"):
        assert np.isfinite(results[key]) and 0 <= results[key] <= 100, key
    # The numbers are pycocotools' on the written detections.
    detections = json.loads((out / "detections.json").read_text())
    again = detection_metrics(results["val_annotations"], detections)
    assert again["box_ap"] == pytest.approx(results["box_ap"]) and again["mask_ap"] == pytest.approx(results["mask_ap"])
    weights = load_file(str(out / "detector.safetensors"))
    assert "backbone.blocks.0.attn.qkv.weight" in weights
    assert "roi_heads.mask_predictor.mask_fcn_logits.weight" in weights
    assert ("roi_heads.stage_predictors.2.bbox_pred.weight" in weights) == cascade
    assert ("roi_heads.box_predictor.bbox_pred.weight" in weights) == (not cascade)
    logged = {key for line in (out / "metrics.jsonl").read_text().splitlines() for key in json.loads(line)}
    assert ("loss_box_reg_stage2" in logged) == cascade and ("loss_box_reg" in logged) == (not cascade)


def test_coco_folder_layout_and_bad_settings(tmp_path):
    annotations, images = synthetic_coco(tmp_path / "made", "train", 4, 32)
    folder = tmp_path / "coco"
    (folder / "annotations").mkdir(parents=True)
    (folder / "annotations" / "instances_train.json").write_text(annotations.read_text())
    (folder / "annotations" / "instances_val.json").write_text(annotations.read_text())
    images.rename(folder / "train")
    (folder / "val").symlink_to(folder / "train")
    stage = _stage(tmp_path, data=str(folder))
    assert len(stage.train_source) == 4 and stage.val_files[1] == folder / "val" and not stage.lvis
    source = CocoDetectionSource(*stage.train_files, train=True)
    assert source.get(0).image.size == (32, 32)
    # LVIS images have no file_name: found by their coco_url, also in the sibling folder the URL names.
    info = {"id": 1, "coco_url": "http://images.cocodataset.org/train2017/000001.png"}
    (folder / "train2017").mkdir()
    (folder / "train2017" / "000001.png").write_bytes(b"x")
    val_source = CocoDetectionSource(folder / "annotations" / "instances_val.json", folder / "val2017")
    assert val_source.image_path(info) == folder / "train2017" / "000001.png"
    for bad, key in (("global_blocks=1,x", "global_blocks"), ("lsj_min=0", "lsj_min"), ("box_head=cascade", "box_head"),
                     ("pyramid_scales=1,2", "pyramid_scales"), ("lvis=maybe", "lvis"), ("image_size=30", "image_size"),
                     ("feature_norm=layer", "feature_norm"), ("synthetic_style=photos", "synthetic_style"),
                     ("fed_loss=true", "fed_loss"),
                     ("repeat_factor_threshold=-0.1", "repeat_factor_threshold")):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            build_config(DetectConfig, None, [bad])
    with pytest.raises(ConfigError, match="'data'"):
        _stage(tmp_path, data=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="'global_blocks'"):
        _stage(tmp_path, global_blocks="6")  # vit_micro4 has blocks 0..5


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("configs/detect_*.yaml")))
def test_paper_recipes_parse(path, mae_run):
    cfg = build_config(DetectConfig, path, {"encoder": str(mae_run)})
    assert cfg.model == "vit_l16" and cfg.image_size == 1024 and cfg.window_size == 14
    assert (cfg.lsj_min, cfg.lsj_max) == (0.1, 2.0) and cfg.layer_decay == 0.8 and cfg.drop_path == 0.4
    assert cfg.lr == 1e-4 and cfg.weight_decay == 0.1 and cfg.batch_size == 64 and cfg.box_head == "4conv1fc"
    assert cfg.cascade and cfg.head_dim == 1024  # Cascade Mask R-CNN, the paper's detector
    assert cfg.fed_loss == ("lvis" in path.name)  # ViTDet trains LVIS with the federated loss
    assert tuple(cfg.pyramid_scales) == (4.0, 2.0, 1.0, 0.5) and cfg.pyramid_channels == 256 and cfg.rel_pos
    assert parse_global_blocks(cfg.global_blocks, 24) == [5, 11, 17, 23]
    assert cfg.lvis == ("true" if "lvis" in path.name else "false")
    assert cfg.feature_norm == "none"  # ViTDet's pyramid; the optional BatchNorm is not in the recipes
    assert cfg.lr_schedule == "step" and tuple(cfg.lr_decay_at) == (0.889, 0.963) and cfg.lr_decay_rate == 0.1
    assert cfg.repeat_factor_threshold == (0.001 if "lvis" in path.name else 0.0)


@pytest.mark.slow
def test_interrupted_detect_resumes_to_the_same_weights(tmp_path):
    settings = {**TINY, "steps": 4, "ckpt_every": 2, "cache_dir": str(tmp_path / "cache")}

    class Crash(RuntimeError):
        pass

    class CrashingStage(DetectStage):
        def after_step(self, model, step):
            if step == 3:
                raise Crash("simulated failure after step 3 (last checkpoint: step 2)")

    whole = tmp_path / "whole"
    train(DetectStage(build_config(DetectConfig, None, {**settings, "out_dir": str(whole)})))
    broken = tmp_path / "broken"
    cfg = build_config(DetectConfig, None, {**settings, "out_dir": str(broken)})
    with pytest.raises(Crash):
        train(CrashingStage(cfg))
    train(DetectStage(cfg))
    expected, resumed = load_file(str(whole / "detector.safetensors")), load_file(str(broken / "detector.safetensors"))
    assert expected.keys() == resumed.keys()
    for key, value in expected.items():
        assert torch.equal(value, resumed[key]), key
    first = json.loads((whole / "results.json").read_text())
    assert json.loads((broken / "results.json").read_text())["box_ap"] == first["box_ap"]
