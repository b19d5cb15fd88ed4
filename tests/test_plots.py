"""torchkeep.plots and the --plot options: real runs and weights drawn to real PNG files."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.cli import main
from torchkeep.errors import UnsupportedSuffixError
from torchkeep.run.reader import RunReader
from torchkeep.stats import relative_changes

pytest.importorskip("matplotlib")

from torchkeep.plots import draw_changes, draw_metrics, plot_changes, plot_metrics


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR, after checking the signature and that the file is complete."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    assert data[-12:-4] == b"\x00\x00\x00\x00IEND"  # the closing chunk: the file is whole
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as done:
        code = int(done.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _run(tmp_path: Path) -> Path:
    """A run of 8 saves kept down to 5: a poisoned checkpoint (NaN weight) and one with a NaN metric."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    ckpts = torchkeep.Checkpointer(tmp_path / "run", keep_last=4, keep_best=1, monitor="val_loss")
    losses = [0.9, 0.5, 0.3, 0.45, 0.4, 0.35, 0.38, 0.33]
    for i, loss in enumerate(losses):
        step = 10 * (i + 1)
        metrics = {"val_loss": loss, "train_loss": loss * 0.8, "val_acc": 1 - loss / 2}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torchkeep.NonFiniteCheckpointWarning)
            if step == 70:
                with torch.no_grad():
                    model[0].weight[0, 0] = float("nan")
            if step == 80:
                with torch.no_grad():
                    model[0].weight[0, 0] = 0.1
                metrics["val_loss"] = float("nan")
            ckpts.save(step, model=model, metrics=metrics)
    return tmp_path / "run"


def test_metrics_picture_marks_best_latest_kept_and_poisoned(tmp_path: Path) -> None:
    run = _run(tmp_path)
    entries = RunReader(run).entries()
    assert [e.step for e in entries] == [30, 50, 60, 70, 80]  # best (30) and the last four kept
    fig = draw_metrics(entries, monitor="val_loss", mode="min", name="run")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "best by val_loss (min): step-00000030" in labels
    assert "latest: step-00000080" in labels
    assert "NaN/Inf at save (poisoned)" in labels
    assert "metric NaN/Inf" in labels
    assert "checkpoint (kept in the run)" in labels
    axes = fig.axes
    assert [ax.get_title(loc="left") for ax in axes] == ["val_loss", "train_loss", "val_acc"]
    assert axes[-1].get_xlabel() == "step"
    assert fig.legends[0].get_title().get_text() == "run: 5 checkpoints, steps 30 to 80"
    line = axes[0].get_lines()[0]  # the metric's own line: finite values only, every kept step
    assert list(line.get_xdata()) == [30, 50, 60, 70]
    assert list(line.get_ydata()) == pytest.approx([0.3, 0.4, 0.35, 0.38])
    before = sorted(p.name for p in run.iterdir())
    out = plot_metrics(run, tmp_path / "metrics.png", monitor="val_loss")
    width, height = _png_size(out)
    assert 600 <= width <= 2000
    assert 400 <= height <= 2000
    assert sorted(p.name for p in run.iterdir()) == before  # a reader: nothing in the run changed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_metrics_picture_without_metrics_or_checkpoints(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    ckpts = torchkeep.Checkpointer(tmp_path / "run")
    for step in (1, 2):
        ckpts.save(step, model=model)
    fig = draw_metrics(RunReader(tmp_path / "run").entries())
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["no metrics saved with these checkpoints"]
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [1, 2]
    assert [t.get_text() for t in draw_metrics([]).axes[0].texts] == ["no checkpoints yet"]


def test_ls_plot_writes_the_picture_and_keeps_json_clean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run(tmp_path)
    code, out, err = _cli(
        [
            "ls",
            str(run),
            "--monitor",
            "val_loss",
            "--mode",
            "max",
            "--json",
            "--plot",
            str(tmp_path / "m.svg"),
        ],
        capsys,
    )
    assert code == 0
    rows = json.loads(out)
    assert [r["step"] for r in rows if r["best"]] == [50]  # the highest val_loss of the unpoisoned
    assert f"picture: {tmp_path / 'm.svg'}" in err
    assert (tmp_path / "m.svg").read_text().lstrip().startswith("<?xml")
    code, _, err = _cli(["ls", str(run), "--plot", str(tmp_path / "m.txt")], capsys)
    assert code == 9
    assert ".png" in err
    assert not (tmp_path / "m.txt").exists()


def _fine_tuned(tmp_path: Path, blocks: int) -> tuple[Path, Path, nn.Module]:
    """Pretrained weights, and the weights after a few steps with all but the last block and head frozen."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(16, 16), nn.LayerNorm(16)]
    model = nn.Sequential(*layers, nn.Linear(16, 5))
    before = tmp_path / "pretrained.safetensors"
    torchkeep.save_weights(model, before)
    for p in model.parameters():
        p.requires_grad_(False)
    for module in (model[-3], model[-2], model[-1]):
        for p in module.parameters():
            p.requires_grad_(True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
    after = tmp_path / "finetuned.safetensors"
    torchkeep.save_weights(model, after)
    return before, after, model


def test_changes_picture_frozen_flat_changed_measured(tmp_path: Path) -> None:
    before, after, _ = _fine_tuned(tmp_path, blocks=4)
    changes = relative_changes(before, after)
    fig = draw_changes(changes, scale="linear")
    ax = fig.axes[0]
    bars = ax.containers[0]
    widths = [bar.get_width() for bar in bars]
    changed = [c for c in changes if c.status == "changed"]
    assert widths == pytest.approx([c.relative for c in changed])
    assert {c.key for c in changed} == {"6.weight", "6.bias", "7.weight", "8.weight", "8.bias"}
    assert [c.status for c in changes if c.key == "7.bias"] == ["from_zero"]  # LayerNorm's bias starts at 0
    frozen = [c for c in changes if c.status == "unchanged"]
    assert len(frozen) == 12
    # one grey row per frozen tensor, at its place in model order (first on top)
    keys = [c.key for c in changes]
    bands = [p for p in ax.patches if p not in bars.patches]
    grey = sorted(round(p.get_y() + p.get_height() / 2) for p in bands)
    assert grey == [keys.index(c.key) for c in frozen]
    assert [t.get_text() for t in ax.get_yticklabels()] == keys
    assert "unchanged (bitwise equal), e.g. frozen" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert "12 unchanged" in fig.get_suptitle()
    out = plot_changes(before, after, tmp_path / "changes.png")
    width, height = _png_size(out)
    assert 600 <= width <= 2000
    assert 250 <= height <= 2000


def test_changes_picture_stays_readable_with_hundreds_of_tensors(tmp_path: Path) -> None:
    before, after, _ = _fine_tuned(tmp_path, blocks=60)  # 242 tensors
    changes = relative_changes(before, after)
    assert len(changes) == 242
    fig = draw_changes(changes)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert 30 <= len(labels) < 242  # thinned, not overprinted
    assert "labelled" in ax.get_ylabel()
    assert ax.get_xscale() in ("linear", "log")
    _, height = fig.get_size_inches()
    assert height <= 30
    out = plot_changes(before, after, tmp_path / "many.png", scale="log")
    assert _png_size(out)[1] <= 3100


def test_diff_plot_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before, after, _ = _fine_tuned(tmp_path, blocks=2)
    code, out, err = _cli(["diff", str(before), str(after), "--plot", str(tmp_path / "c.png")], capsys)
    assert code == 1  # they differ: diff's own verdict, picture or not
    assert "changed" in out
    assert f"picture: {tmp_path / 'c.png'}" in err
    _png_size(tmp_path / "c.png")
    code, _, err = _cli(
        ["diff", str(before), str(after), "--plot", str(tmp_path / "c.png"), "--scale", "cubic"], capsys
    )
    assert code == 2
    assert "--scale" in err


def test_an_unknown_suffix_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedSuffixError, match=r"\.png"):
        plot_changes(tmp_path / "missing-a.pt", tmp_path / "missing-b.pt", tmp_path / "c.doc")


def test_without_matplotlib_the_error_names_the_extra(tmp_path: Path) -> None:
    script = (
        "import sys; sys.modules['matplotlib'] = None\n"  # as if it were not installed
        "import torchkeep\n"
        "from torchkeep.plots import plot_metrics\n"
        "try:\n"
        "    plot_metrics([], sys.argv[1])\n"
        "except torchkeep.MissingExtraError as err:\n"
        "    print('MissingExtraError', err)\n"
        "from torchkeep.cli import main\n"
        "main(['diff', sys.argv[2], sys.argv[2], '--plot', sys.argv[1]])\n"
    )
    weights = tmp_path / "w.safetensors"
    torchkeep.save_weights({"w": torch.ones(2)}, weights)
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "m.png"), str(weights)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        "MissingExtraError this needs matplotlib, which is not installed; pip install 'torchkeep[plot]'"
        in done.stdout
    )
    assert done.returncode == 9  # the CLI: a usage error, one line
    assert "pip install 'torchkeep[plot]'" in done.stderr
    assert not (tmp_path / "m.png").exists()
