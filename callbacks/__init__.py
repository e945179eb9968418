"""Lightning callbacks used by ``train.py`` (configured in ``conf/callbacks/``)."""

from callbacks.index_rebuild import IndexRebuild, RebuildRecord
from callbacks.progress_bar import TrainingProgressBar

__all__ = ["IndexRebuild", "RebuildRecord", "TrainingProgressBar"]
