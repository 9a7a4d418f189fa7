"""Training: one epoch loop (``loop``) with its checkpoints (``checkpoint``) and event files
(``tensorboard``), the trainers that plug into it (``classifier``, ``detector``; ``fusion``
trains its small network on its own), their settings (``config``), the run folders they
write as types (``runs``), and the evaluations of trained runs (``evaluate``,
``evaluate_detection``)."""
