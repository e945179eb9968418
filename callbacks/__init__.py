"""Lightning callbacks used by ``train.py`` (configured in ``conf/callbacks/``)."""

from callbacks.index_rebuild import IndexRebuild, RebuildRecord

__all__ = ["IndexRebuild", "RebuildRecord"]
