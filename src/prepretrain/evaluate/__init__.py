"""Transfer evaluations of an encoder: linear probe, low-shot, kNN (and zero-shot beside them).

Entry points:

* ``runner.run_evaluation(cfg)`` runs one evaluation (``ProbeConfig``, ``LowShotConfig``,
  ``KNNConfig``) and writes ``results.json`` + ``config.yaml`` to ``cfg.out_dir``;
* ``runner.evaluate_encoder(encoder, out_dir, evaluations=...)`` runs several on one encoder,
  sharing one pass of frozen features (what the pipeline calls per encoder);
* every evaluator has the signature ``evaluate(encoder: FrozenEncoder, data: EvalData, cfg)
  -> dict`` (``common``), and new ones register with ``runner.register_evaluation``.

Full finetuning is a training stage (``prepretrain.stages.finetune``) on the one engine.
"""

from .common import EvalData, FrozenEncoder, open_eval_data
from .knn import evaluate_knn
from .linear import evaluate_probe
from .lowshot import evaluate_lowshot
from .metrics import topk_accuracy
from .runner import EVALUATIONS, evaluate_encoder, register_evaluation, run_evaluation
from .zeroshot import ZeroShotScorer, build_classifier, run_zeroshot

__all__ = [
    "EVALUATIONS",
    "EvalData",
    "FrozenEncoder",
    "ZeroShotScorer",
    "build_classifier",
    "evaluate_encoder",
    "evaluate_knn",
    "evaluate_lowshot",
    "evaluate_probe",
    "open_eval_data",
    "register_evaluation",
    "run_evaluation",
    "run_zeroshot",
    "topk_accuracy",
]
