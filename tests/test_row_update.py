"""How rows move (hf_softmax.row_update): each rule against torch's own SGD on per-row
parameters, the norm projection, the knobs' errors, and the knobs kept by shard slices."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from hf_softmax.build import build_module
from hf_softmax.classifier import SampledClassifier
from hf_softmax.heads import build_head
from hf_softmax.row_update import auto_row_norm, resolve_row_norm
from hf_softmax.samplers import build_sampler
from tests.conftest import REPO, module_cfg

N, D, B = 40, 8, 6
LR, MU, WD = 0.3, 0.9, 5e-2


def make(head="cosface", num=12, **kw):
    h = build_head(head)
    s = build_sampler({"name": "random", "num": num}, N, h.metric, seed=0)
    return SampledClassifier(N, D, h, s, seed=0, momentum=MU, weight_decay=WD, **kw)


def batches(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(B, D, generator=g), torch.randint(0, N, (B,), generator=g))
        for _ in range(steps)
    ]


def reference_run(clf, opt_kwargs, row_norm=None, steps=5):
    """Train ``clf`` and, beside it, one nn.Parameter per row under torch.optim.SGD on the
    same active sets (rows projected to ``row_norm`` after each step) -> the reference rows."""
    rows = [nn.Parameter(r.clone()) for r in clf.weight]
    opt = torch.optim.SGD(rows, **opt_kwargs)
    for feats, labels in batches(steps):
        out = clf(feats, labels)
        out.loss.backward()
        clf.step(out, LR)
        ids = out.active.ids.tolist()
        opt.zero_grad(set_to_none=True)
        w_ref = torch.stack([rows[i] for i in ids])
        ref_loss = F.cross_entropy(clf.head(feats, w_ref, out.targets), out.targets)
        ref_loss.backward()
        opt.step()
        if row_norm is not None:
            with torch.no_grad():
                for i in ids:
                    rows[i].mul_(row_norm / rows[i].norm())
        torch.testing.assert_close(out.loss, ref_loss)
    return torch.stack([r.detach() for r in rows])


@pytest.mark.parametrize("head", ["linear", "cosface"])
def test_immediate_equals_torch_sgd_without_momentum_at_lr_over_one_minus_mu(head):
    """The whole momentum tail at once: plain SGD at lr / (1 - mu); no momentum is kept."""
    clf = make(head, row_momentum="immediate")
    ref = reference_run(clf, dict(lr=LR / (1 - MU), momentum=0.0, weight_decay=WD))
    torch.testing.assert_close(clf.weight, ref, rtol=1e-5, atol=1e-6)
    assert clf.store.momentum_buffer.shape == (0, D)  # no momentum kept: N * D * 4 bytes saved
    assert "momentum" not in clf.state_dict()


@pytest.mark.parametrize("momentum", ["lazy", "immediate"])
def test_row_norm_keeps_rows_on_the_sphere_and_equals_sgd_then_projection(momentum):
    r = 0.7
    clf = make("cosface", row_norm=r, row_momentum=momentum)
    norms = clf.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.full((N,), r))  # initial rows projected too
    if momentum == "lazy":
        kwargs = dict(lr=LR, momentum=MU, weight_decay=WD)
    else:
        kwargs = dict(lr=LR / (1 - MU), momentum=0.0, weight_decay=WD)
    ref = reference_run(clf, kwargs, row_norm=r)
    torch.testing.assert_close(clf.weight, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clf.weight.norm(dim=1), torch.full((N,), r))


def test_row_norm_auto_follows_the_run_and_numbers_need_a_cosine_head():
    assert auto_row_norm(20.0, 0.1, 0.9, 128) == pytest.approx(0.5)  # the Hangul setting
    assert auto_row_norm(64.0, 0.1, 0.9, 128) > auto_row_norm(20.0, 0.1, 0.9, 128)
    assert resolve_row_norm("auto", "cosine", lambda: 0.7) == 0.7
    assert resolve_row_norm("auto", "ip", lambda: 0.7) is None
    assert resolve_row_norm(None, "ip") is None and resolve_row_norm("null", "cosine") is None
    assert resolve_row_norm(2, "cosine") == 2.0
    with pytest.raises(ValueError, match=r"row_norm = auto needs the run's lr"):
        resolve_row_norm("auto", "cosine")
    with pytest.raises(ValueError, match=r"row_norm = 0.5 needs a cosine head"):
        make("linear", row_norm=0.5)
    with pytest.raises(ValueError, match=r"row_norm must be > 0"):
        make("cosface", row_norm=0)
    with pytest.raises(ValueError, match=r"row_norm must be a number > 0, null or auto"):
        make("cosface", row_norm="big")
    with pytest.raises(ValueError, match=r"row_momentum must be one of"):
        make("cosface", row_momentum="eager")


@pytest.mark.parametrize("head", ["cosface", "linear"])
def test_train_config_defaults_and_configs_saved_before_the_knobs(head):
    """conf/train.yaml: row_norm auto (from lr, momentum, scale, batch), immediate momentum;
    a saved config without the keys keeps the old rule (free rows, lazy momentum)."""
    cfg = module_cfg("random", head, lr=0.1, momentum=0.9)
    cfg.sampler.num = 12
    train_yaml = OmegaConf.load(REPO / "conf" / "train.yaml")
    cfg.classifier = train_yaml.classifier
    cfg.data = {"batch_size": 32}
    store = build_module(OmegaConf.to_container(cfg), N).classifier.store
    expected = auto_row_norm(cfg.head.scale, 0.1, 0.9, 32) if head == "cosface" else None
    assert store.row_norm == expected and store.row_momentum == "immediate"
    if expected is not None:
        torch.testing.assert_close(store.weight.norm(dim=1), torch.full((N,), expected))
    cfg.classifier = {"offload": False}  # as saved before row_norm / row_momentum existed
    old = build_module(OmegaConf.to_container(cfg), N).classifier.store
    assert old.row_norm is None and old.row_momentum == "lazy"


def test_knobs_survive_slicing_and_state_round_trip():
    clf = make("cosface", row_norm=0.5, row_momentum="immediate")
    for feats, labels in batches(3):
        out = clf(feats, labels)
        out.loss.backward()
        clf.step(out, LR)
    part = clf.store.sliced(10, 30)
    assert (part.row_norm, part.row_momentum) == (0.5, "immediate")
    fresh = make("cosface", row_norm=0.5, row_momentum="immediate")
    fresh.load_state_dict(clf.state_dict())
    assert torch.equal(fresh.weight, clf.weight)
    lazy = make("cosface", row_norm=0.5, row_momentum="lazy")  # switching rules on resume
    lazy.load_state_dict(clf.state_dict())  # no momentum saved: it starts at zero
    assert torch.equal(lazy.weight, clf.weight) and not lazy.store.momentum_buffer.any()
    clf.load_state_dict(lazy.state_dict())  # a saved momentum is dropped
    assert clf.store.momentum_buffer.shape == (0, D)


def test_full_softmax_stays_plain_under_auto_and_projects_with_a_number():
    """sampler=full: W a parameter under torch SGD; row_norm auto leaves it free (the plain
    reference); a number keeps all N rows at that norm after every optimizer step."""
    cfg = module_cfg("full", "cosface", lr=0.1, momentum=0.9)
    cfg.classifier = {"offload": False, "row_norm": "auto", "row_momentum": "immediate"}
    cfg.data = {"batch_size": 32}
    assert build_module(OmegaConf.to_container(cfg), N).classifier.row_norm is None
    cfg.classifier.row_norm = 0.5
    clf = build_module(OmegaConf.to_container(cfg), N).classifier
    torch.testing.assert_close(clf.weight.detach().norm(dim=1), torch.full((N,), 0.5))
    opt = torch.optim.SGD(clf.parameters(), lr=LR, momentum=MU)
    for _, labels in batches(2):
        out = clf(torch.randn(B, 32), labels)  # module_cfg's embedding dim
        out.loss.backward()
        opt.step()
        clf.step(out, LR)
        opt.zero_grad()
    torch.testing.assert_close(clf.weight.detach().norm(dim=1), torch.full((N,), 0.5))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["classifier.row_norm=big"], r"row_norm must be a number > 0, null or auto, got 'big'"),
        (["head=linear", "classifier.row_norm=0.5"], r"row_norm = 0.5 needs a cosine head"),
        (["classifier.row_momentum=eager"], r"row_momentum must be one of"),
    ],
)
def test_bad_row_knobs_fail_before_any_work(overrides, message):
    from hydra import compose, initialize_config_dir

    from hf_softmax.config_check import check_config

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with pytest.raises(ValueError, match=message):
        check_config(cfg)
