"""SampledClassifier sharded over 2 gloo processes vs the single-process one and a dense oracle.

Each worker builds the same global batches (seeded), keeps its rank's slice (ranks get
different batch sizes on purpose), runs the sharded classifier and, on the full batch, a
single-process ``SampledClassifier`` whose sampler replays the union of the ranks' active sets
(rank order). Loss, feature and row gradients, the rows after ``classifier.step`` and the
consolidated state dict must match. Workers assert; a failure in any rank fails the test.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hf_softmax.classifier import SampledClassifier
from hf_softmax.collectives import shard_range, split_count
from hf_softmax.dense_classifier import DenseClassifier
from hf_softmax.heads import build_head
from hf_softmax.row_store import initial_rows
from hf_softmax.samplers import build_sampler, sampler_class
from hf_softmax.samplers.base import ActiveSet, Sampler
from tests.gloo_ranks import spawn_ranks

N, D, M = 37, 8, 20  # odd N: uneven shards [0, 19), [19, 37)
SIZES = (5, 7)  # per-rank batch sizes (unequal on purpose)
WORLD = 2
LR, MU, WD = 0.5, 0.9, 5e-2


class ReplaySampler(Sampler):
    """Real Sampler whose selection is ``active``, set before each step (the union of the
    ranks' sets)."""

    name = "replay"

    def __init__(self, num_classes: int, num: int, metric: str) -> None:
        super().__init__(num_classes, num, metric)
        self.active: ActiveSet | None = None

    def select(self, features: torch.Tensor, labels: torch.Tensor) -> ActiveSet:
        return self.active


def _batches(steps: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        feats = torch.randn(sum(SIZES), D, generator=g, dtype=torch.float64).float()
        labels = torch.randint(0, N, (sum(SIZES),), generator=g)
        out.append((feats, labels))
    return out


def _sharded(head_name: str, sampler: str, num: int = M, **kw) -> SampledClassifier:
    head = build_head(head_name)
    factory = functools.partial(sampler_class({"name": sampler}), num=num)
    return SampledClassifier(N, D, head, factory, num=num, momentum=MU, weight_decay=WD, **kw)


def _reference(head_name: str, state: dict, sampler: Sampler | None = None) -> SampledClassifier:
    head = build_head(head_name)
    sampler = sampler or build_sampler({"name": "random", "num": M}, N, head.metric)
    ref = SampledClassifier(N, D, head, sampler, momentum=MU, weight_decay=WD)
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
    init = SampledClassifier(
        N, D, build_head("linear"), build_sampler({"name": "random", "num": M}, N, "ip"), seed=7
    )
    init = init.state_dict()  # fmt: skip
    clf.load_state_dict(init)
    assert clf.store.range == (start, end)
    if clf.sampler.needs_index:
        clf.sampler.swap(clf.sampler.build_index(clf.snapshot_weights()))
    replay = ReplaySampler(N, M, build_head(head_name).metric)
    ref = _reference(head_name, init, replay)
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
        replay.active = ActiveSet(union, targets, int(labels_all.unique().numel()))
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
        clf.step(out, LR)
        ref.step(ref_out, LR)

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
    top = ref.topk(probe_all, 5)[lo : lo + len(probe)]
    assert torch.equal(clf.topk(probe, 5, chunk_size=4), top)


def _check_dense_oracle(rank: int) -> None:
    """M = N (every class active each step, so lazy SGD is dense SGD): the sharded classifier
    and the single-process one (``shard=False``, no collectives although the group exists)
    give the loss, feature gradient and rows of DenseClassifier + torch SGD, over 2 steps."""
    lo, size = sum(SIZES[:rank]), SIZES[rank]
    sharded = _sharded("cosface", "random", num=N)
    single = _sharded("cosface", "random", num=N, shard=False)
    dense = DenseClassifier(N, D, build_head("cosface"))
    opt = torch.optim.SGD(dense.parameters(), lr=LR, momentum=MU, weight_decay=WD)
    assert sharded.store.num_rows == shard_range(N, WORLD, rank)[1] - sharded.store.start
    assert single.store.range == (0, N) and torch.equal(single.weight, dense.weight.detach())
    for feats_all, labels_all in _batches(2, seed=5):
        f_d = feats_all.clone().requires_grad_(True)
        out_d = dense(f_d, labels_all)
        opt.zero_grad()
        out_d.loss.backward()
        opt.step()
        f_1 = feats_all.clone().requires_grad_(True)
        out_1 = single(f_1, labels_all)
        out_1.loss.backward()
        single.step(out_1, LR)
        f_s = feats_all[lo : lo + size].clone().requires_grad_(True)
        out_s = sharded(f_s, labels_all[lo : lo + size])
        out_s.loss.backward()
        sharded.step(out_s, LR)
        for out in (out_1, out_s):
            torch.testing.assert_close(out.loss, out_d.loss, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(f_1.grad, f_d.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(f_s.grad / WORLD, f_d.grad[lo : lo + size], rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
    w = dense.weight.detach()
    torch.testing.assert_close(single.weight, w, rtol=1e-4, atol=1e-5)
    start, end = sharded.store.range
    torch.testing.assert_close(sharded.weight, w[start:end], rtol=1e-4, atol=1e-5)


def _check_legacy_ddp(rank: int) -> None:
    """tests/fixtures/legacy_ckpt/ddp.ckpt (consolidated by the pre-redesign code): each rank
    loads its block of rows, momentum and touched mask."""
    state = _legacy_classifier_state("ddp")
    n, d = state["weight"].shape
    factory = functools.partial(sampler_class({"name": "exact"}), num=16)
    clf = SampledClassifier(n, d, build_head("cosface"), factory, num=16)
    clf.load_state_dict(state)
    start, end = shard_range(n, WORLD, rank)
    assert clf.store.range == (start, end) and clf.num == 16 and clf.sampler.num == 8
    assert torch.equal(clf.weight, state["weight"][start:end])
    assert torch.equal(clf.store.momentum_buffer, state["momentum"][start:end])
    assert torch.equal(clf.store.touched, state["touched"][start:end])


def _legacy_classifier_state(name: str) -> dict[str, torch.Tensor]:
    path = Path(__file__).parent / "fixtures" / "legacy_ckpt" / f"{name}.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    prefix = "classifier."
    return {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def _check_init_invariant(rank: int) -> None:
    """The consolidated initial W is the single-process one."""
    state = _sharded("cosface", "random").state_dict()
    if rank == 0:
        single = _sharded("cosface", "random", shard=False).weight
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
    w = initial_rows(0, N, N, D, 0.01, 0)
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


def _check_row_rule(rank: int, tmp: Path) -> None:
    """Rows on a sphere with the momentum tail at once, split over the ranks: every row at
    its norm, no momentum kept or consolidated, the state loads into one process."""
    clf = _sharded("cosface", "random", row_norm=0.5, row_momentum="immediate")
    lo = sum(SIZES[:rank])
    for feats_all, labels_all in _batches(2):
        out = clf(feats_all[lo : lo + SIZES[rank]], labels_all[lo : lo + SIZES[rank]])
        out.loss.backward()
        clf.step(out, LR)
    assert clf.store.momentum_buffer.shape == (0, D)
    torch.testing.assert_close(clf.weight.norm(dim=1), torch.full((clf.weight.shape[0],), 0.5))
    state = clf.state_dict()
    if rank == 0:
        assert "momentum" not in state and state["weight"].shape == (N, D)
        torch.save(state, tmp / "row-rule.pt")


def _worker(rank: int, tmp: str) -> None:
    for head_name, sampler in (("cosface", "exact"), ("arcface", "random"), ("linear", "exact")):
        _check_training(rank, head_name, sampler, Path(tmp))
    _check_dense_oracle(rank)
    _check_legacy_ddp(rank)
    _check_ddp_backbone(rank)
    _check_num_schedule(rank)
    _check_init_invariant(rank)
    _check_row_rule(rank, Path(tmp))


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    """Runs every 2-process check once; returns the dir with rank 0's consolidated states."""
    tmp = tmp_path_factory.mktemp("sharded")
    spawn_ranks(_worker, str(tmp), world=WORLD)
    return tmp


def test_two_ranks_match_single_process(two_rank_run):
    """Loss, feature and row gradients, sparse steps, consolidated state, predict (workers)."""
    assert sorted(p.name for p in two_rank_run.glob("*.pt")) == [
        "arcface-random.pt",
        "cosface-exact.pt",
        "linear-exact.pt",
        "row-rule.pt",
    ]
    state = torch.load(two_rank_run / "row-rule.pt")
    single = _sharded("cosface", "random", row_norm=0.5, row_momentum="immediate")
    single.load_state_dict(state)
    torch.testing.assert_close(single.weight, state["weight"])


def test_two_rank_checkpoint_loads_in_one_process(two_rank_run):
    state = torch.load(two_rank_run / "cosface-exact.pt")
    single = _reference("cosface", state)  # strict load into SampledClassifier
    torch.testing.assert_close(single.weight, state["weight"])
    sharded = _sharded("cosface", "exact")  # world size 1: the whole block
    sharded.load_state_dict(state)
    assert (*sharded.store.range, sharded.num) == (0, N, M)
    torch.testing.assert_close(sharded.weight, state["weight"])
    torch.testing.assert_close(sharded.store.momentum_buffer, state["momentum"])
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


def test_initial_rows_do_not_depend_on_the_split():
    """Blocks of 8 rows straddle the shard boundaries; block 0 is the plain seeded draw."""
    full = initial_rows(0, N, N, D, 0.01, 3, block=8)
    for world in (1, 2, 3, 5):
        parts = [initial_rows(*shard_range(N, world, r), N, D, 0.01, 3, block=8)
                 for r in range(world)]  # fmt: skip
        assert torch.equal(torch.cat(parts), full)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(full[:8], torch.empty(8, D).normal_(0.0, 0.01, generator=g))
    g = torch.Generator().manual_seed(3)
    assert torch.equal(
        initial_rows(0, N, N, D, 0.01, 3), torch.empty(N, D).normal_(0.0, 0.01, generator=g)
    )
