"""Shared model machinery: the :class:`FoundationModelMixin` every scfm model uses."""

from ._docs import scfm_dsp
from ._foundation import FoundationModelMixin, record_in_uns
from ._training import CellDataSplitter, ClassifierTrainingPlan, PretrainingPlan

__all__ = [
    "CellDataSplitter",
    "ClassifierTrainingPlan",
    "FoundationModelMixin",
    "PretrainingPlan",
    "record_in_uns",
    "scfm_dsp",
]
