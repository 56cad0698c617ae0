"""Evaluation with EleutherAI's lm-eval-harness: tasks (shipped, the user's own, lm-eval's), in-process or against a
served endpoint (``harness``), results in MLflow and the model card (``record``), runs side by side (``compare``)."""
