"""replace_head on every torchvision classifier, pretrained() via the real cache path, transfer."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import torchkeep

CLASSIFIERS = torchvision.models.list_models(module=torchvision.models)


def build_without_data(name: str) -> nn.Module:
    """The model on the meta device: real layers and shapes, no memory, no initialization time.

    Building and running all 80 classifiers for real takes minutes on 2 cores; shapes are what
    replace_head must get right. Models whose constructor computes with tensors (regnet) are built
    on the CPU with initialization skipped, then moved to meta.
    """
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(name, weights=None)
    except NotImplementedError:
        pass
    skipped = {}
    for init in (
        "kaiming_normal_",
        "kaiming_uniform_",
        "normal_",
        "uniform_",
        "zeros_",
        "ones_",
        "constant_",
        "trunc_normal_",
        "xavier_uniform_",
    ):
        skipped[init] = getattr(nn.init, init)
        setattr(nn.init, init, lambda tensor, *args, **kwargs: tensor)
    try:
        return torchvision.models.get_model(name, weights=None).to("meta")
    finally:
        for init, fn in skipped.items():
            setattr(nn.init, init, fn)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # googlenet/inception warn about their default init
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_replace_head_on_every_torchvision_classifier(name: str) -> None:
    model = build_without_data(name)
    torchkeep.replace_head(model, 7)
    model.eval()
    out = model(torch.empty(2, 3, 224, 224, device="meta"))
    assert out.shape == (2, 7)
    for head in torchkeep.head_names(model):
        layer = model.get_submodule(head)
        assert (layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels) == 7


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("resnet18", 64),
        ("squeezenet1_1", 64),
        ("mobilenet_v3_small", 64),
        ("shufflenet_v2_x0_5", 64),
        ("googlenet", 64),
        ("vit_b_32", 224),
    ],
)
def test_real_forward_after_replace_head(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    torchkeep.replace_head(model, 7)
    with torchkeep.evaluating(model):
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_aux_heads_are_replaced_too() -> None:
    with torch.device("meta"):
        model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
        torchkeep.replace_head(model, 3)
        model.train()
        out = model(torch.empty(2, 3, 299, 299))
    assert out.logits.shape == (2, 3)
    assert out.aux_logits.shape == (2, 3)
    assert torchkeep.head_names(model) == ["fc", "AuxLogits.fc"]


def test_new_head_matches_dtype_device_and_takes_dropout_and_attr() -> None:
    model = torchvision.models.resnet18(weights=None).to(torch.bfloat16)
    torchkeep.replace_head(model, 4, dropout=0.3)
    assert isinstance(model.fc, nn.Sequential)
    assert model.fc[1].weight.dtype == torch.bfloat16
    assert model.fc[0].p == 0.3

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(8, 16)
            self.out = nn.Sequential(nn.ReLU(), nn.Linear(16, 3), nn.Softmax(dim=1))

    custom = Custom()
    with pytest.raises(torchkeep.NoMatchError, match="attr="):
        torchkeep.replace_head(custom, 5)
    torchkeep.replace_head(custom, 5, attr="out")
    assert custom.out[1].out_features == 5
    assert custom.out[1].in_features == 16


def test_tutorial_my_new_net_in_two_lines() -> None:
    """vgg19 + Linear(1000, 1), frozen except the head: same trainable set as the tutorial's loops."""

    class MyNewNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vgg19 = torchvision.models.vgg19(weights=None)
            self.linear_layer = nn.Linear(1000, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear_layer(self.vgg19(x))

    with torch.device("meta"):
        manual, ours = MyNewNet(), MyNewNet()
    for param in manual.parameters():
        param.requires_grad = False
    for param in manual.linear_layer.parameters():
        param.requires_grad = True
    torchkeep.freeze(ours)
    torchkeep.unfreeze(ours, "linear_layer")
    expected = [n for n, p in manual.named_parameters() if p.requires_grad]
    assert (
        [n for n, p in ours.named_parameters() if p.requires_grad]
        == expected
        == [
            "linear_layer.weight",
            "linear_layer.bias",
        ]
    )


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home"


def cache_path(name: str) -> Path:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def test_pretrained_reads_the_torch_hub_cache(torch_home: Path) -> None:
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    path = cache_path("resnet18")
    assert str(path).startswith(str(torch_home))
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)  # exactly what the download leaves there
    model = torchkeep.pretrained("resnet18")
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_pretrained_new_head_and_frozen_backbone(torch_home: Path) -> None:
    reference = torchvision.models.resnet18(weights=None)
    path = cache_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = torchkeep.pretrained("resnet18", num_classes=5, freeze_backbone=True)
    assert model.fc.out_features == 5
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert torch.equal(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert not model.bn1.training or model.training  # held in eval by its hook during forward
    stats = model.bn1.running_mean.clone()
    model.train()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(model.bn1.running_mean, stats)


def test_pretrained_from_a_local_weights_file(tmp_path: Path, torch_home: Path) -> None:
    reference = torchvision.models.mobilenet_v3_small(weights=None)
    torchkeep.save_weights(reference, tmp_path / "mine.safetensors")
    model = torchkeep.pretrained("mobilenet_v3_small", weights_path=tmp_path / "mine.safetensors")
    assert torch.equal(model.classifier[3].weight, reference.classifier[3].weight)
    assert not (torch_home / "hub").exists()  # nothing was downloaded or cached


def test_offline_and_not_cached_says_where_to_put_the_file(
    torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(url: str, dst: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(torchkeep.WeightsUnavailableError) as info:
        torchkeep.pretrained("resnet18")
    assert info.value.cache_path == cache_path("resnet18")
    assert str(info.value.cache_path) in str(info.value)
    assert "weights_path" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_unknown_names_and_preprocessing() -> None:
    with pytest.raises(torchkeep.NoMatchError, match="resnet"):
        torchkeep.pretrained("resnet19")
    with pytest.raises(torchkeep.NoMatchError, match="IMAGENET1K_V1"):
        torchkeep.pretrained("resnet18", weights="IMAGENET9K")
    transform = torchkeep.preprocessing("resnet18")
    assert transform(torch.rand(3, 300, 400)).shape == (3, 224, 224)


class SmallCNN(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    optimizer = torch.optim.Adam(torchkeep.trainable(model), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for i in torch.randperm(len(x)).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            optimizer.step()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torchkeep.evaluating(model):
        return (model(x).argmax(1) == y).float().mean().item()


def test_transfer_learning_beats_training_from_scratch(tmp_path: Path) -> None:
    """Pretrain on digits 0-4, new head for 5-9, fine-tune on 5 images per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    source = SmallCNN(5)
    fit(source, x[y < 5], y[y < 5], epochs=15)
    torchkeep.save_weights(source, tmp_path / "pretrained.safetensors")
    backbone = {k: v.clone() for k, v in source.state_dict().items() if k.startswith("features.")}

    x_new, y_new = x[y >= 5], y[y >= 5] - 5
    few = torch.cat([torch.nonzero(y_new == c)[:5, 0] for c in range(5)])
    rest = torch.ones(len(y_new), dtype=torch.bool)
    rest[few] = False

    torch.manual_seed(1)
    transferred = SmallCNN(5)
    report = torchkeep.load_into(transferred, tmp_path / "pretrained.safetensors")
    assert report.ok
    torchkeep.replace_head(transferred, 5)
    assert torchkeep.head_names(transferred) == ["classifier.3"]
    report = torchkeep.freeze(transferred, "features")  # the convolutional backbone
    assert report.eval_norm_layers == ("features.1", "features.4")
    fit(transferred, x_new[few], y_new[few], epochs=60)

    torch.manual_seed(1)
    scratch = SmallCNN(5)
    fit(scratch, x_new[few], y_new[few], epochs=60)

    for key, value in backbone.items():  # frozen means bitwise unchanged, BatchNorm statistics too
        assert torch.equal(transferred.state_dict()[key], value), key
    transfer_acc = accuracy(transferred, x_new[rest], y_new[rest])
    scratch_acc = accuracy(scratch, x_new[rest], y_new[rest])
    print(f"digits 5-9 from 25 images: transfer {transfer_acc:.1%}, scratch {scratch_acc:.1%}")
    assert transfer_acc > scratch_acc


def test_a_1000_class_checkpoint_loads_into_a_10_class_model(tmp_path: Path) -> None:
    imagenet = torchvision.models.resnet18(weights=None)
    torch.save({"state_dict": nn.DataParallel(imagenet).state_dict()}, tmp_path / "imagenet.ckpt")
    model = torchkeep.replace_head(torchvision.models.resnet18(weights=None), 10)
    with pytest.raises(torchkeep.KeyMismatchError, match="skip_mismatched=True"):
        torchkeep.load_into(model, tmp_path / "imagenet.ckpt")
    report = torchkeep.load_into(model, tmp_path / "imagenet.ckpt", skip_mismatched=True)
    assert [(m.key, m.file_shape, m.model_shape) for m in report.mismatched] == [
        ("fc.weight", (1000, 512), (10, 512)),
        ("fc.bias", (1000,), (10,)),
    ]
    assert "fc.weight" in str(report)
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
