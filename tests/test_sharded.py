"""ShardedClassifier on 2 gloo processes vs the single-process SampledClassifier.

Each worker builds the same global batches (seeded), keeps its rank's slice (ranks get
different batch sizes on purpose), runs the sharded classifier and, on the full batch, a
single-process ``SampledClassifier`` whose sampler replays the union of the ranks' active sets
(rank order). Loss, feature and row gradients, the rows after ``sparse_step`` and the
consolidated state dict must match. Workers assert; a failure in any rank fails the test.
"""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import hf_softmax.sharded as sharded_module
from hf_softmax.classifier import SampledClassifier
from hf_softmax.heads import build_head
from hf_softmax.samplers import build_sampler
from hf_softmax.samplers.base import ActiveSet, Sampler
from hf_softmax.sharded import (
    ShardedClassifier,
    _init_rows,
    shard_range,
    split_count,
)

N, D, M = 37, 8, 20  # odd N: uneven shards [0, 19), [19, 37)
SIZES = (5, 7)  # per-rank batch sizes (unequal on purpose)
WORLD = 2
LR, MU, WD = 0.5, 0.9, 5e-2


class ReplaySampler(Sampler):
    """Real Sampler whose selection is the given ActiveSet (the union of the ranks' sets)."""

    name = "replay"

    def __init__(self, num_classes: int, active: ActiveSet) -> None:
        super().__init__(num_classes, active.num, "ip")
        self.active = active

    def select(self, features: torch.Tensor, labels: torch.Tensor) -> ActiveSet:
        return self.active


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(steps: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        feats = torch.randn(sum(SIZES), D, generator=g, dtype=torch.float64).float()
        labels = torch.randint(0, N, (sum(SIZES),), generator=g)
        out.append((feats, labels))
    return out


def _sharded(head_name: str, sampler: str, num: int = M, **kw) -> ShardedClassifier:
    head = build_head(head_name)
    cfg = {"name": sampler, "num": num}
    return ShardedClassifier(N, D, num, cfg, head, momentum=MU, weight_decay=WD, **kw)


def _reference(head_name: str, state: dict) -> SampledClassifier:
    head = build_head(head_name)
    ref = SampledClassifier(N, D, build_sampler({"name": "random", "num": M}, N, head.metric),
                            head, momentum=MU, weight_decay=WD)  # fmt: skip
    ref.load_state_dict(state)
    return ref


def _gather_active(out, rank: int) -> tuple[list[torch.Tensor], list[int]]:
    """Every rank's global active ids, in rank order."""
    ids = [torch.zeros(M + 40, dtype=torch.int64) for _ in range(WORLD)]
    mine = torch.full((M + 40,), -1, dtype=torch.int64)
    mine[: out.active.ids.numel()] = out.active.ids
    dist.all_gather(ids, mine)
    return [i[i >= 0] for i in ids]


def _check_training(rank: int, head_name: str, sampler: str, tmp: Path) -> None:
    """Two steps: loss, grads, rows and consolidated state vs the single-process classifier."""
    torch.manual_seed(0)
    start, end = shard_range(N, WORLD, rank)
    lo = sum(SIZES[:rank])
    clf = _sharded(head_name, sampler)
    # common starting point: a single-process classifier's state, sliced by the loader
    init = SampledClassifier(N, D, build_sampler({"name": "random", "num": M}, N, "ip"),
                             build_head("linear"), seed=7).state_dict()  # fmt: skip
    clf.load_state_dict(init)
    assert (clf.start, clf.end) == (start, end)
    if clf.sampler.needs_index:
        clf.sampler.swap(clf.sampler.build_index(clf.snapshot_weights()))
    ref = _reference(head_name, init)
    for feats_all, labels_all in _batches(2):
        feats = feats_all[lo : lo + SIZES[rank]].clone().requires_grad_(True)
        out = clf(feats, labels_all[lo : lo + SIZES[rank]])
        assert out.active.ids.numel() == split_count(M, WORLD, rank)
        assert bool(((out.active.ids >= start) & (out.active.ids < end)).all())
        out.loss.backward()

        parts = _gather_active(out, rank)
        union = torch.cat(parts)
        assert union.unique().numel() == union.numel() == M
        positions = {int(c): i for i, c in enumerate(union)}
        targets = torch.tensor([positions[int(y)] for y in labels_all])
        ref.sampler = ReplaySampler(N, ActiveSet(union, targets, int(labels_all.unique().numel())))
        f_ref = feats_all.clone().requires_grad_(True)
        ref_out = ref(f_ref, labels_all)
        ref_out.loss.backward()

        torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-4, atol=1e-5)
        # top-1 over the union == argmax of the single-process plain logits (no margin)
        ref_plain = ref.head.plain_logits(feats_all, ref_out.rows)
        ref_acc = (ref_plain.argmax(1) == ref_out.targets).float().mean()
        torch.testing.assert_close(out.accuracy, ref_acc)
        torch.testing.assert_close(out.accuracy, ref_out.accuracy)
        # the all-gather backward multiplies by the world size (undoes DDP's averaging)
        torch.testing.assert_close(
            feats.grad / WORLD, f_ref.grad[lo : lo + SIZES[rank]], rtol=1e-4, atol=1e-5
        )
        offset = sum(p.numel() for p in parts[:rank])
        ref_rows = ref_out.rows.grad[offset : offset + out.active.ids.numel()]
        torch.testing.assert_close(out.rows.grad, ref_rows, rtol=1e-4, atol=1e-5)
        clf.sparse_step(LR)
        ref.sparse_step(LR)

    state = clf.state_dict()  # collective: consolidated on rank 0
    if rank == 0:
        ref_state = ref.state_dict()
        for key in ("weight", "momentum", "touched", "num_updates"):
            torch.testing.assert_close(state[key], ref_state[key], rtol=1e-4, atol=1e-5)
        assert state["weight"].shape == (N, D)
        torch.save(state, tmp / f"{head_name}-{sampler}.pt")
    else:
        assert state["weight"].shape == (0, D)
    # predict: argmax over all N classes, collective, same as single process
    probe = torch.randn(SIZES[rank], D, generator=torch.Generator().manual_seed(rank))
    probe_all = torch.cat([torch.randn(s, D, generator=torch.Generator().manual_seed(r))
                           for r, s in enumerate(SIZES)])  # fmt: skip
    assert torch.equal(
        clf.predict(probe, chunk_size=4), ref.predict(probe_all)[lo : lo + len(probe)]
    )


def _check_dense_full(rank: int) -> None:
    """``full`` sampler sharded: every local class active; loss = dense CE over all N."""
    clf = _sharded("arcface", "full")
    assert clf.all_active and clf.sampler.num_classes == shard_range(N, WORLD, rank)[1] - clf.start
    feats_all, labels_all = _batches(1, seed=5)[0]
    lo = sum(SIZES[:rank])
    out = clf(feats_all[lo : lo + SIZES[rank]], labels_all[lo : lo + SIZES[rank]])
    full_w = torch.cat([_init_rows(*shard_range(N, WORLD, r), N, D, 0.01, 0) for r in range(WORLD)])
    head = build_head("arcface")
    expected = F.cross_entropy(head(feats_all, full_w, labels_all), labels_all)
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-5)
    assert out.logits.shape == (sum(SIZES), clf.num_local)


def _check_init_invariant(rank: int) -> None:
    """The consolidated initial W is the same for every world size."""
    sharded_module._INIT_BLOCK = 8  # blocks straddle the shard boundary at 19
    state = _sharded("cosface", "random").state_dict()
    if rank == 0:
        single = _init_rows(0, N, N, D, 0.01, 0)
        torch.testing.assert_close(state["weight"], single, rtol=0, atol=0)


def _check_ddp_backbone(rank: int) -> None:
    """Backbone in torch DDP + sharded classifier: the backbone's gradient (after DDP's
    averaging) equals the single-process gradient of the loss on the concatenated batch."""
    torch.manual_seed(11)
    backbone = nn.Linear(6, D)
    ref_backbone = copy.deepcopy(backbone)
    ddp = DistributedDataParallel(backbone)
    g = torch.Generator().manual_seed(12)
    x_all, labels_all = (
        torch.randn(sum(SIZES), 6, generator=g),
        torch.randint(0, N, (12,), generator=g),
    )
    lo = sum(SIZES[:rank])
    clf = _sharded("arcface", "random")
    out = clf(ddp(x_all[lo : lo + SIZES[rank]]), labels_all[lo : lo + SIZES[rank]])
    out.loss.backward()
    union = torch.cat(_gather_active(out, rank))
    positions = {int(c): i for i, c in enumerate(union)}
    targets = torch.tensor([positions[int(y)] for y in labels_all])
    w = torch.cat([_init_rows(*shard_range(N, WORLD, r), N, D, 0.01, 0) for r in range(WORLD)])
    head = build_head("arcface")
    ref_loss = F.cross_entropy(head(ref_backbone(x_all), w[union], targets), targets)
    ref_loss.backward()
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(backbone.weight.grad, ref_backbone.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(backbone.bias.grad, ref_backbone.bias.grad, rtol=1e-4, atol=1e-5)


def _check_num_schedule(rank: int) -> None:
    """Setting M (``num_schedule``) gives every rank's sampler its share."""
    clf = _sharded("cosface", "random")
    clf.num = 11
    assert clf.num == 11 and clf.sampler.num == split_count(11, WORLD, rank)


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for head_name, sampler in (("cosface", "exact"), ("arcface", "random"),
                                   ("linear", "exact")):  # fmt: skip
            _check_training(rank, head_name, sampler, Path(tmp))
        _check_dense_full(rank)
        _check_ddp_backbone(rank)
        _check_num_schedule(rank)
        _check_init_invariant(rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    """Runs every 2-process check once; returns the dir with rank 0's consolidated states."""
    tmp = tmp_path_factory.mktemp("sharded")
    mp.spawn(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=True)
    return tmp


def test_two_ranks_match_single_process(two_rank_run):
    """Loss, feature and row gradients, sparse steps, consolidated state, predict (workers)."""
    assert sorted(p.name for p in two_rank_run.glob("*.pt")) == [
        "arcface-random.pt",
        "cosface-exact.pt",
        "linear-exact.pt",
    ]


def test_two_rank_checkpoint_loads_in_one_process(two_rank_run):
    state = torch.load(two_rank_run / "cosface-exact.pt")
    single = _reference("cosface", state)  # strict load into SampledClassifier
    torch.testing.assert_close(single.weight, state["weight"])
    sharded = _sharded("cosface", "exact")  # world size 1: the whole block
    sharded.load_state_dict(state)
    assert (sharded.start, sharded.end, sharded.num) == (0, N, M)
    torch.testing.assert_close(sharded.weight, state["weight"])
    torch.testing.assert_close(sharded.momentum_buffer, state["momentum"])
    feats = torch.randn(9, D)
    assert torch.equal(sharded.predict(feats), single.predict(feats))
    again = sharded.state_dict()
    for key in ("weight", "momentum", "touched", "num_updates", "sampler_counters"):
        torch.testing.assert_close(again[key], state[key])


def test_shard_ranges_cover_all_classes():
    for n in (1, 7, 37, 1000):
        for world in (1, 2, 3, 8):
            if n < world:
                continue
            ranges = [shard_range(n, world, r) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))
            assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1
