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
