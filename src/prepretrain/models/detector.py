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

``cascade=True`` gives Cascade Mask R-CNN (Cai and Vasconcelos, 2018), the detector of the MAWS
paper and of ViTDet's best results: three box stages trained at IoU 0.5, 0.6 and 0.7, each
refining the boxes of the one before with its own class-agnostic regression, scores averaged
over the stages at inference, the mask head on the last stage's boxes. torchvision has no
cascade; ``CascadeRoIHeads`` adds one on torchvision's own sampling, matching, losses and
post-processing, with detectron2's stage settings (box-coder weights 10/20/30, the box head's
input gradient scaled by 1/3, later stages labelled without sampling). For LVIS the cascade can
train its classifiers with the federated loss (Zhou et al., 2021), as ViTDet's LVIS recipe does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from .vitdet import LayerNorm2d, ViTDetBackbone, anchor_sizes

CROWD_IGNORE_IOA = 0.5  # an anchor/proposal this much inside a crowd region is ignored, not a negative
# Cascade R-CNN's three stages as detectron2 configures them: the IoU at which a proposal is a
# positive, and the box coder's weights (tighter at each stage, as the regressions get smaller).
CASCADE_IOUS = (0.5, 0.6, 0.7)
CASCADE_BOX_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))


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


class AgnosticBoxPredictor(nn.Module):
    """Class scores and one class-agnostic box regression (a cascade stage regresses boxes, not classes).

    The regression is repeated for every class, so torchvision's class-specific loss and
    post-processing apply unchanged: each picks the same four numbers whatever the class.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x).repeat(1, self.cls_score.out_features)


FED_LOSS_CLASSES = 50  # detectron2's fed_loss_num_classes
FED_LOSS_POWER = 0.5  # draw weight of a category: (images that contain it) ** 0.5, detectron2's freq_weight_power


def federated_classes(labels: torch.Tensor, weights: torch.Tensor, count: int = FED_LOSS_CLASSES) -> torch.Tensor:
    """The classes (torchvision labels, background 0 excluded) whose logits a federated loss trains
    on this batch: every class among ``labels``, then classes drawn without replacement in
    proportion to ``weights`` (one per label, background first) until there are ``count``."""
    present = labels.unique()
    present = present[present > 0]
    probability = weights.detach().float().clone()
    probability[0] = 0.0
    probability[present] = 0.0
    missing = min(count - len(present), int((probability > 0).sum()))
    if missing <= 0:
        return present
    return torch.cat([present, torch.multinomial(probability, missing, replacement=False)])


def sigmoid_classification_loss(logits: torch.Tensor, labels: torch.Tensor,
                                classes: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class binary cross-entropy on the foreground logits (a background proposal is a negative
    for every class), summed over ``classes`` only when given (the federated loss), per proposal."""
    target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)[:, 1:]
    loss = F.binary_cross_entropy_with_logits(logits[:, 1:], target, reduction="none")
    if classes is not None:
        trained = torch.zeros(logits.shape[1], dtype=loss.dtype, device=loss.device)
        trained[classes] = 1.0
        loss = loss * trained[1:]
    return loss.sum() / max(len(labels), 1)


def _scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged going forward, its gradient times ``scale`` going back."""
    return x * scale + x.detach() * (1.0 - scale)


class CascadeRoIHeads(CrowdAwareRoIHeads):
    """Cascade R-CNN's box stages on torchvision's RoI heads (crowd-aware, with the same mask head).

    Training: stage 0 samples proposals as Mask R-CNN does (IoU 0.5). Each later stage takes the
    previous stage's refined boxes (detached, clipped, empty ones dropped), labels all of them at
    its own IoU without sampling, and regresses against its own coder. Each stage's losses are
    logged as ``loss_classifier_stageK`` and ``loss_box_reg_stageK``; the RoI features' gradient
    is scaled by 1/stages so the backbone gets one head's worth. The mask head learns on the last
    stage's positives. Inference: every stage scores the boxes it is given, the class
    probabilities are averaged over the stages, and the last stage's boxes go through
    torchvision's post-processing steps (score threshold, small boxes, per-class NMS, top-k).

    With ``fed_loss_weights`` (one per label, background first: detectron2 uses each category's
    image count to the power 0.5) the classifiers are trained with the federated loss: sigmoid
    cross-entropy over the classes present in the batch plus negatives drawn by those weights,
    ``fed_loss_classes`` in all, so a category is never penalised on images whose annotators
    did not look for it; class probabilities are then sigmoids.
    """

    def __init__(self, base: RoIHeads, box_heads: Sequence[nn.Module], box_predictors: Sequence[nn.Module],
                 ious: Sequence[float] = CASCADE_IOUS,
                 box_weights: Sequence[tuple[float, float, float, float]] = CASCADE_BOX_WEIGHTS,
                 fed_loss_weights: torch.Tensor | None = None, fed_loss_classes: int = FED_LOSS_CLASSES):
        if not len(box_heads) == len(box_predictors) == len(ious) == len(box_weights):
            raise ValueError("one box head, predictor, IoU and coder weight per cascade stage")
        sampler = base.fg_bg_sampler
        super().__init__(base.box_roi_pool, None, None, ious[0], ious[0], sampler.batch_size_per_image,
                         sampler.positive_fraction, box_weights[0], base.score_thresh, base.nms_thresh,
                         base.detections_per_img, base.mask_roi_pool, base.mask_head, base.mask_predictor)
        self.stage_heads = nn.ModuleList(box_heads)
        self.stage_predictors = nn.ModuleList(box_predictors)
        self.stage_matchers = [Matcher(iou, iou, allow_low_quality_matches=False) for iou in ious]
        self.stage_coders = [BoxCoder(weights) for weights in box_weights]
        self.federated = fed_loss_weights is not None
        self.fed_loss_classes = fed_loss_classes
        self.register_buffer("fed_loss_weights", fed_loss_weights, persistent=False)

    @property
    def num_stages(self) -> int:
        return len(self.stage_heads)

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            return [], self._train(features, proposals, image_shapes, targets)
        return self._detect(features, proposals, image_shapes), {}

    def _run_stage(self, stage: int, features, proposals, image_shapes):
        pooled = _scale_gradient(self.box_roi_pool(features, proposals, image_shapes), 1.0 / self.num_stages)
        return self.stage_predictors[stage](self.stage_heads[stage](pooled))

    def _refine(self, stage: int, regression: torch.Tensor, proposals, image_shapes) -> list[torch.Tensor]:
        """The stage's boxes, per image, clipped to the image and detached (the next stage's proposals)."""
        boxes = self.stage_coders[stage].decode(regression[:, :4].detach(), proposals)[:, 0]
        return [box_ops.clip_boxes_to_image(b, shape)
                for b, shape in zip(boxes.split([len(p) for p in proposals]), image_shapes)]

    def _label(self, stage: int, proposals, targets):
        """Match every proposal to the ground truth at this stage's IoU (no sampling; crowd-ignored ones dropped)."""
        gt_boxes = [t["boxes"].to(p.dtype) for t, p in zip(targets, proposals)]
        self.proposal_matcher, self._crowd = self.stage_matchers[stage], [t.get("crowd_boxes") for t in targets]
        try:
            matched, labels = self.assign_targets_to_proposals(proposals, gt_boxes, [t["labels"] for t in targets])
        finally:
            self.proposal_matcher, self._crowd = self.stage_matchers[0], []
        kept_proposals, kept_matched, kept_labels, matched_boxes = [], [], [], []
        for props, match, label, gt in zip(proposals, matched, labels, gt_boxes):
            keep = label >= 0
            kept_proposals.append(props[keep])
            kept_matched.append(match[keep])
            kept_labels.append(label[keep])
            gt = gt if len(gt) else props.new_zeros((1, 4))
            matched_boxes.append(gt[match[keep]])
        targets_ = self.stage_coders[stage].encode(matched_boxes, kept_proposals)
        return kept_proposals, kept_matched, kept_labels, targets_

    def _train(self, features, proposals, image_shapes, targets) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        proposals, matched, labels, regression_targets = self.select_training_samples(proposals, targets)
        for stage in range(self.num_stages):
            logits, regression = self._run_stage(stage, features, proposals, image_shapes)
            classification, box_regression = fastrcnn_loss(logits, regression, labels, list(regression_targets))
            if self.federated:
                flat = torch.cat(labels)
                classes = federated_classes(flat, self.fed_loss_weights, self.fed_loss_classes)
                classification = sigmoid_classification_loss(logits, flat, classes)
            losses[f"loss_classifier_stage{stage}"] = classification
            losses[f"loss_box_reg_stage{stage}"] = box_regression
            if stage + 1 < self.num_stages:
                boxes = self._refine(stage, regression, proposals, image_shapes)
                boxes = [b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])] for b in boxes]  # empty boxes dropped
                proposals, matched, labels, regression_targets = self._label(stage + 1, boxes, targets)
        if self.has_mask():
            positive = [torch.where(label > 0)[0] for label in labels]
            mask_proposals = [p[i] for p, i in zip(proposals, positive)]
            pooled = self.mask_roi_pool(features, mask_proposals, image_shapes)
            mask_logits = self.mask_predictor(self.mask_head(pooled))
            losses["loss_mask"] = maskrcnn_loss(mask_logits, mask_proposals, [t["masks"] for t in targets],
                                                [t["labels"] for t in targets],
                                                [m[i] for m, i in zip(matched, positive)])
        return losses

    def _postprocess(self, probabilities: torch.Tensor, boxes: list[torch.Tensor]):
        """torchvision's ``postprocess_detections`` steps on class-agnostic boxes (already clipped)
        and given class probabilities: every (box, class) pair, background excluded, above the score
        threshold and not empty, per-class NMS, the ``detections_per_img`` best."""
        found: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] = ([], [], [])
        num_classes = probabilities.shape[1]
        for image_boxes, scores in zip(boxes, probabilities.split([len(b) for b in boxes])):
            labels = torch.arange(1, num_classes, device=scores.device).expand(len(image_boxes), -1).reshape(-1)
            scores = scores[:, 1:].reshape(-1)
            image_boxes = image_boxes[:, None].expand(-1, num_classes - 1, -1).reshape(-1, 4)
            keep = torch.where(scores > self.score_thresh)[0]
            keep = keep[box_ops.remove_small_boxes(image_boxes[keep], min_size=1e-2)]
            keep = keep[box_ops.batched_nms(image_boxes[keep], scores[keep], labels[keep], self.nms_thresh)]
            keep = keep[: self.detections_per_img]
            for collected, values in zip(found, (image_boxes, scores, labels)):
                collected.append(values[keep])
        return found

    def _detect(self, features, proposals, image_shapes) -> list[dict[str, torch.Tensor]]:
        probabilities = []
        for stage in range(self.num_stages):
            logits, regression = self._run_stage(stage, features, proposals, image_shapes)
            probabilities.append(logits.sigmoid() if self.federated else logits.softmax(-1))
            proposals = self._refine(stage, regression, proposals, image_shapes)
        boxes, scores, labels = self._postprocess(torch.stack(probabilities).mean(0), proposals)
        result = [{"boxes": b, "labels": c, "scores": s} for b, s, c in zip(boxes, scores, labels)]
        if self.has_mask():
            mask_logits = self.mask_predictor(self.mask_head(
                self.mask_roi_pool(features, [r["boxes"] for r in result], image_shapes)))
            for probability, r in zip(maskrcnn_inference(mask_logits, [r["labels"] for r in result]), result):
                r["masks"] = probability
        return result


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
    cascade: bool = False,
    fed_loss_weights: torch.Tensor | None = None,
    box_batch_per_image: int = 512,
    rpn_batch_per_image: int = 256,
    rpn_pre_nms_train: int = 2000,
    rpn_post_nms_train: int = 2000,
    rpn_pre_nms_test: int = 1000,
    rpn_post_nms_test: int = 1000,
    score_threshold: float = 0.05,
    detections_per_image: int = 100,
) -> nn.Module:
    """Mask R-CNN (Faster R-CNN when ``masks`` is false) over ``backbone``; ``num_classes`` excludes background.
    ``cascade`` makes it Cascade (Mask) R-CNN: three box stages of ``box_head``, see ``CascadeRoIHeads``;
    ``fed_loss_weights`` (cascade only) trains its classifiers with the federated loss."""
    if fed_loss_weights is not None and not cascade:
        raise ValueError("the federated loss is implemented for the cascade heads: set cascade=True")
    channels = backbone.out_channels
    levels = [str(i) for i in range(len(backbone.pyramid.stages))]
    sizes = anchor_sizes(backbone.strides)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    rpn_head = RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=2)

    def make_box_head() -> nn.Module:
        if box_head == "4conv1fc":
            return FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [head_dim], norm_layer=LayerNorm2d)
        if box_head == "2fc":
            return TwoMLPHead(channels * 7 * 7, head_dim)
        raise ValueError(f"box_head must be 4conv1fc or 2fc, got '{box_head}'")

    common = dict(
        rpn_anchor_generator=anchors, rpn_head=rpn_head,
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 0), box_head=make_box_head(),
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
    if cascade:
        stages = len(CASCADE_IOUS)
        model.roi_heads = CascadeRoIHeads(model.roi_heads, [make_box_head() for _ in range(stages)],
                                          [AgnosticBoxPredictor(head_dim, num_classes + 1) for _ in range(stages)],
                                          fed_loss_weights=fed_loss_weights)
    return model
