"""Mask R-CNN (torchvision) on a ViTDet backbone, with crowd regions as ignore regions.

Why torchvision's detector: it is the maintained, dependency-free Mask R-CNN that already
sits beside the torch version we pin (detectron2 has no wheels for it), and it trains in any
``nn.Module`` loop: ``model(images, targets)`` returns its loss dict. What we add:

* heads as ViTDet configures them: an RPN head with two 3x3 convolutions, a "4conv1fc" box
  head and a 4-convolution mask head with LayerNorm (``box_head="2fc"`` gives torchvision's
  lighter two-layer MLP, which the CPU demo uses), anchors of 8x each level's stride;
* LSJ-friendly inputs: in training the images are already scaled and cropped by the data
  pipeline (``_skip_resize``), and every batch is padded to the square ``image_size`` (zeros
  after normalisation, as ViTDet pads); at evaluation images are resized so their longest side
  is ``image_size`` and detections come back in original image coordinates;
* crowd regions (COCO ``iscrowd=1``) passed as ``targets[i]["crowd_boxes"]`` are never
  positives, and anchors or proposals lying mostly inside one (intersection over their own
  area > 0.5) that would otherwise be negatives are ignored (label -1), so the detector is
  not taught that a crowd of people is background.

Cascade box heads (the paper's Cascade Mask R-CNN) are not implemented: torchvision has no
cascade, and a faithful one (three stages with IoU 0.5/0.6/0.7 and their own box regressions)
is a separate piece of work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign

from .vitdet import LayerNorm2d, ViTDetBackbone, anchor_sizes

CROWD_IGNORE_IOA = 0.5  # an anchor/proposal this much inside a crowd region is ignored, not a negative


def inside_fraction(regions: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """For each box, the largest fraction of its area inside any of ``regions`` (both x1y1x2y2): (len(boxes),)."""
    if regions.numel() == 0 or boxes.numel() == 0:
        return boxes.new_zeros(len(boxes))
    top_left = torch.max(regions[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.min(regions[:, None, 2:], boxes[None, :, 2:])
    overlap = (bottom_right - top_left).clamp(min=0).prod(-1)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1e-6)
    return (overlap / area[None]).max(0).values


def _ignore_in_crowds(labels: torch.Tensor, boxes: torch.Tensor, crowd: torch.Tensor | None) -> torch.Tensor:
    if crowd is None or crowd.numel() == 0:
        return labels
    ignore = (inside_fraction(crowd.to(boxes), boxes) > CROWD_IGNORE_IOA) & (labels == 0)
    return torch.where(ignore, torch.full_like(labels, -1), labels)


class CrowdAwareRPN(RegionProposalNetwork):
    """torchvision's RPN; anchors inside crowd regions are ignored instead of being negatives."""

    def assign_targets_to_anchors(self, anchors, targets):
        labels, matched = super().assign_targets_to_anchors(anchors, targets)
        labels = [_ignore_in_crowds(lab, anc, t.get("crowd_boxes")) for lab, anc, t in zip(labels, anchors, targets)]
        return labels, matched


class CrowdAwareRoIHeads(RoIHeads):
    """torchvision's RoI heads; sampled proposals inside crowd regions are ignored instead of negatives."""

    _crowd: list[torch.Tensor | None] = []

    def select_training_samples(self, proposals, targets):
        self._crowd = [t.get("crowd_boxes") for t in targets]
        try:
            return super().select_training_samples(proposals, targets)
        finally:
            self._crowd = []

    def assign_targets_to_proposals(self, proposals, gt_boxes, gt_labels):
        matched, labels = super().assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        crowd = self._crowd or [None] * len(labels)
        return matched, [_ignore_in_crowds(lab, prop, c) for lab, prop, c in zip(labels, proposals, crowd)]


class ViTDetMaskRCNN(MaskRCNN):
    """torchvision's Mask R-CNN whose ``set_grad_checkpointing`` reaches the ViT blocks (the training
    loop calls it for ``grad_checkpointing=true``)."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


class ViTDetFasterRCNN(FasterRCNN):
    """torchvision's Faster R-CNN (no masks) with the same ``set_grad_checkpointing``."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


def build_detector(
    backbone: ViTDetBackbone,
    num_classes: int,
    image_size: int,
    *,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    masks: bool = True,
    box_head: str = "4conv1fc",
    head_dim: int = 1024,
    box_batch_per_image: int = 512,
    rpn_batch_per_image: int = 256,
    rpn_pre_nms_train: int = 2000,
    rpn_post_nms_train: int = 2000,
    rpn_pre_nms_test: int = 1000,
    rpn_post_nms_test: int = 1000,
    score_threshold: float = 0.05,
    detections_per_image: int = 100,
) -> nn.Module:
    """Mask R-CNN (Faster R-CNN when ``masks`` is false) over ``backbone``; ``num_classes`` excludes background."""
    channels = backbone.out_channels
    levels = [str(i) for i in range(len(backbone.pyramid.stages))]
    sizes = anchor_sizes(backbone.strides)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    rpn_head = RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=2)
    if box_head == "4conv1fc":
        head: nn.Module = FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [head_dim], norm_layer=LayerNorm2d)
    elif box_head == "2fc":
        head = TwoMLPHead(channels * 7 * 7, head_dim)
    else:
        raise ValueError(f"box_head must be 4conv1fc or 2fc, got '{box_head}'")
    common = dict(
        rpn_anchor_generator=anchors, rpn_head=rpn_head,
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 0), box_head=head,
        box_predictor=FastRCNNPredictor(head_dim, num_classes + 1),
        min_size=image_size, max_size=image_size, image_mean=list(image_mean), image_std=list(image_std),
        size_divisible=image_size, _skip_resize=True,
        rpn_pre_nms_top_n_train=rpn_pre_nms_train, rpn_post_nms_top_n_train=rpn_post_nms_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_test, rpn_post_nms_top_n_test=rpn_post_nms_test,
        rpn_batch_size_per_image=rpn_batch_per_image, box_batch_size_per_image=box_batch_per_image,
        box_score_thresh=score_threshold, box_detections_per_img=detections_per_image,
    )
    if masks:
        model: nn.Module = ViTDetMaskRCNN(
            backbone, num_classes=None, mask_roi_pool=MultiScaleRoIAlign(levels, 14, 0),
            mask_head=MaskRCNNHeads(channels, [channels] * 4, 1, norm_layer=LayerNorm2d),
            mask_predictor=MaskRCNNPredictor(channels, channels, num_classes + 1), **common,
        )
    else:
        model = ViTDetFasterRCNN(backbone, num_classes=None, **common)
    # Same modules and state, plus crowd handling: the subclasses add methods only.
    model.rpn.__class__ = CrowdAwareRPN
    model.roi_heads.__class__ = CrowdAwareRoIHeads
    return model
