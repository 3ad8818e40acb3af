"""The speed-record tricks (airbench) as recipe fields: each does what its name says, a run
with all of them resumes exactly, and their network exports with parity and TTA in the graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer.augment import BatchAugment, step_generator
from trainer.checkpoint import load_checkpoint
from trainer.data import load_dataset
from trainer.export import export_checkpoint
from trainer.models import build_model
from trainer.optim import MuonSGD
from trainer.recipe import AugmentConfig, recipe_from_dict
from trainer.run import Trainer
from trainer.selection import select_epoch
from trainer.whitening import Whiten, fit_whitening

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- selection
def _history(*rows: tuple[float, float]) -> list[dict[str, float]]:
    return [
        {"epoch": i + 1, "val_accuracy": acc, "val_loss": loss}
        for i, (acc, loss) in enumerate(rows)
    ]


def test_selection_rules_break_ties_and_read_the_loss_as_documented():
    # the case: epochs 2 and 4 tie on accuracy, 4 has the lower loss
    h = _history((0.90, 0.40), (0.933, 0.303), (0.92, 0.29), (0.933, 0.277), (0.925, 0.28))
    assert select_epoch(h, "val_accuracy") == 2  # first of the tie
    assert select_epoch(h, "val_accuracy_latest") == 4
    assert select_epoch(h, "val_loss") == 4
    assert select_epoch(h, "last") == 5
    no_val = [{"epoch": 1, "val_accuracy": None}, {"epoch": 2, "val_accuracy": None}]
    assert {select_epoch(no_val, r) for r in ("val_accuracy", "val_loss", "last")} == {2}


# ----------------------------------------------------------------------------- flips
def test_alternate_flips_show_every_image_both_ways_every_two_epochs():
    aug = BatchAugment(AugmentConfig(flip="alternate"), fill=(0,), images=64, seed=3)
    x = torch.randint(0, 256, (64, 1, 6, 6), dtype=torch.uint8)
    ids = torch.randperm(64)
    views = [aug(x[ids], step_generator(3, e, 0), ids=ids, epoch=e) for e in range(3)]
    mirrored = [(v != x[ids]).flatten(1).any(1) for v in views]
    assert torch.equal(mirrored[0], ~mirrored[1])  # each image: one epoch each way
    assert torch.equal(views[0], views[2])
    assert 16 < int(mirrored[0].sum()) < 48  # about half, drawn once per image
    halves = [
        aug(x[ids[i : i + 32]], step_generator(3, 1, 0), ids=ids[i : i + 32], epoch=1)
        for i in (0, 32)
    ]
    assert torch.equal(torch.cat(halves), views[1])  # no dependence on the batch split


# ----------------------------------------------------------------------------- whitening
def test_whitening_decorrelates_the_training_images_patches():
    ds = load_dataset("shapes", seed=0, shapes_train=600, shapes_test=50)
    images = torch.from_numpy(ds.train.images)
    layers = [{"type": "whiten", "kernel": 2}, {"type": "global_pool"}]
    r = recipe_from_dict({"name": "w", "data": {"name": "shapes"}, "model": {"layers": layers}})
    mean = images.float().mean().item() / 255
    std = images.float().std().item() / 255
    model = build_model(r.model, (1, 28, 28), 6, [mean], [std])
    whiten = model.features[0][0]
    assert isinstance(whiten, Whiten) and not whiten.weight.requires_grad
    fit_whitening(model, images)
    with torch.no_grad():
        out = whiten(model.preprocess(images[:500])) - whiten.bias.view(1, -1, 1, 1)
    first = out[:, :4].permute(0, 2, 3, 1).reshape(-1, 4).double()  # one per eigenvector
    cov = first.T @ first / len(first)
    assert torch.allclose(cov, torch.eye(4, dtype=torch.float64), atol=0.08), cov
    assert torch.equal(out[:, 4:], -out[:, :4])  # and their negatives


# ----------------------------------------------------------------------------- muon
def test_muon_takes_conv_filters_flattened_and_orthogonalises_their_update():
    conv = torch.nn.Parameter(torch.randn(16, 8, 3, 3))
    with pytest.raises(ValueError, match="2D"):  # why our own: torch's refuses conv filters
        torch.optim.Muon([conv])
    opt = MuonSGD([{"params": [conv], "muon": True}], lr=0.1, momentum=0.0, nesterov=False)
    conv.grad = torch.randn_like(conv)
    before = conv.detach().clone()
    opt.step()
    normed = before * (4.0 / before.norm())  # renormalised to sqrt(out) first
    update = ((normed - conv.detach()) / 0.1).reshape(16, -1)
    s = torch.linalg.svdvals(update)
    assert s.min() > 0.5 and s.max() < 1.3, s  # every direction moved about equally
    cosine = F.cosine_similarity(update.flatten(), conv.grad.flatten(), dim=0)
    assert cosine > 0.3  # still a descent direction


# ----------------------------------------------------------------------------- a whole run
EVERY_TRICK = {
    "name": "shapes-tricks",
    "data": {"name": "shapes", "shapes_train": 2000, "shapes_test": 500, "val_size": 200},
    "augment": {"flip": "alternate", "crop_padding": 1},
    "model": {
        "layers": [
            {"type": "whiten", "kernel": 2, "bias_epochs": 1},
            {"type": "conv", "filters": 16, "init": "dirac", "act": "gelu"},
            {"type": "pool"},
            {"type": "conv", "filters": 32, "init": "dirac", "act": "gelu"},
            {"type": "pool"},
            {"type": "global_pool", "kind": "max"},
        ],
        "bn_momentum": 0.4,
        "bn_scale": "frozen",
    },
    "optim": {"lr": 0.05, "conv_update": "muon", "muon_lr": 0.1, "bn_bias_lr_scale": 4.0},
    "train": {
        "epochs": 3,
        "batch_size": 50,
        "label_smoothing": 0.2,
        "lookahead": True,
        "select": "last",
    },
    "export": {"tta": "mirror_shift"},
}


class Interrupted(Exception):
    pass


def test_every_trick_resumes_exactly_and_exports_tta_with_parity(tmp_path):
    recipe = recipe_from_dict(EVERY_TRICK)
    straight = Trainer(recipe, tmp_path / "straight", quiet=True)
    result = straight.fit()

    # the same run interrupted after its first epoch, then resumed from last.pt
    broken = Trainer(recipe, tmp_path / "resumed", quiet=True)
    run_epoch = broken._run_epoch

    def first_only() -> dict:
        if broken.epoch == 1:
            raise Interrupted
        return run_epoch()

    broken._run_epoch = first_only  # type: ignore[method-assign]
    with pytest.raises(Interrupted):
        broken.fit()
    first = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["model"]
    Trainer(recipe, tmp_path / "resumed", quiet=True).fit(resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["model"]
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name
    # the whitening filters never train; its bias trains for bias_epochs=1 only
    assert torch.equal(a["features.0.0.weight"], first["features.0.0.weight"])
    assert first["features.0.0.bias"].abs().sum() > 0
    whiten_bias = straight.model.features[0][0].bias
    group = next(g for g in straight.optimizer.param_groups if g["params"][0] is whiten_bias)
    assert group["train_steps"] == straight.steps_per_epoch and group["lr"] == 0.0

    # TTA was scored, and the plain figure kept beside it
    saved = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert saved["tta"] == "mirror_shift" and 0 < saved["test_accuracy_no_tta"] <= 1
    assert result.test_accuracy > 1 / 6
    summary = (tmp_path / "straight" / "summary.txt").read_text()
    assert "0:whiten" in summary and "27x27x8" in summary and "2x2" in summary

    exported = export_checkpoint(tmp_path / "straight", tmp_path / "models", insight=True)
    m = exported.manifest
    assert m["parity"]["argmax_agreement"] == 1.0
    assert m["test_accuracy"] == pytest.approx(saved["test_accuracy"], abs=1e-9)
    assert m["training"]["export"]["tta"] == "mirror_shift"
    plain = export_checkpoint(tmp_path / "straight", tmp_path / "models", tta="none")
    assert plain.manifest["test_accuracy"] == pytest.approx(saved["test_accuracy_no_tta"])
    assert plain.manifest["training"]["export"]["tta"] == "none"
