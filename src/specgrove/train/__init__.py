"""Training sorted drafts (S2D's SoFT): distillation text from the targets (`data`), sorted fine-tuning
of every exit at once (`soft`), and the `specgrove train-sorted` command (`cli`)."""

from specgrove.train.data import Sample, batched_generate, distill, read_samples
from specgrove.train.soft import SoftSettings, SortedTrainModel, load_init, train_soft

__all__ = [
    "Sample",
    "SoftSettings",
    "SortedTrainModel",
    "batched_generate",
    "distill",
    "load_init",
    "read_samples",
    "train_soft",
]
