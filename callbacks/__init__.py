"""Lightning callbacks used by ``train.py`` (configured in ``conf/callbacks/``)."""

from callbacks.gc_freeze import FreezeGC
from callbacks.index_rebuild import IndexRebuild, RebuildRecord
from callbacks.m_schedule import MSchedule
from callbacks.progress_bar import TrainingProgressBar

__all__ = ["FreezeGC", "IndexRebuild", "MSchedule", "RebuildRecord", "TrainingProgressBar"]
