"""The verbs behind the CLI, each wiring data, models, methods, the training loop and tracking: ``train``,
``search``, ``distill``, ``evaluate``, ``derive`` and ``import-teacher``."""

from dfakd.jobs.derive import derive
from dfakd.jobs.distill import distill
from dfakd.jobs.evaluate import evaluate_checkpoint, import_teacher
from dfakd.jobs.search import search
from dfakd.jobs.train import train

__all__ = ["derive", "distill", "evaluate_checkpoint", "import_teacher", "search", "train"]
