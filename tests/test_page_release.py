"""page_release: memory handed back to the kernel before its owner frees it (GIL released),
and a background build's snapshot handed back once its index is built."""

import sys

import numpy as np
import pytest
import torch

from hf_softmax.index_build import BuildJob, run_build
from hf_softmax.page_release import release_array, release_range
from hf_softmax.samplers.exact import ExactSampler

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise: Linux")


@linux
def test_release_array_drops_whole_pages_and_leaves_small_arrays_alone():
    big = np.ones((1024, 1024), np.float32)  # 4 MB
    assert release_array(big) >= 4 * 2**20 - 8192  # whole pages inside the buffer
    assert not big[8:-8].any()  # anonymous pages come back as zeros
    small = np.ones(1000, np.float32)
    assert release_array(small) == 0 and small.all()
    assert release_array(big[:, ::2]) == 0  # not contiguous: untouched
    assert release_range(0, 0) == 0


class _ViewIndex(ExactSampler):
    """A sampler whose index is a view of the snapshot (build_index's contract broken)."""

    def build_index(self, weights):
        return torch.from_numpy(weights)


@linux
@pytest.mark.parametrize("cls, released", [(ExactSampler, True), (_ViewIndex, False)])
def test_a_snapshot_taken_for_a_build_is_released_unless_the_index_views_it(cls, released):
    rows = np.random.default_rng(0).standard_normal((4096, 256)).astype(np.float32)
    snapshots = []

    def snapshot():
        snapshots.append(rows.copy())
        return snapshots[-1]

    sampler = cls(num_classes=4096, num=64, metric="ip")
    job = BuildJob(start_step=0, kind="build", background=True)
    run_build(job, sampler, snapshot, np.empty(0, np.int64))
    assert job.error is None and job.done.is_set()
    assert torch.equal(torch.as_tensor(job.index), torch.from_numpy(rows))  # a good index
    assert (not snapshots[0][8:-8].any()) is released  # handed back: zeros
    given = rows.copy()  # a snapshot passed in (not taken here) is never released
    run_build(BuildJob(start_step=0, kind="build", background=False), sampler, given,
              np.empty(0, np.int64))  # fmt: skip
    assert np.array_equal(given, rows)
