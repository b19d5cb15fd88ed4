"""``torchkeep demo``: the save-and-load walkthrough, for real, in a minute.

Builds the tutorial's model, trains it briefly on real digits, shows its
parameters and buffers, saves weights, a whole model and a checkpoint, loads
each back (the whole model in a fresh process that cannot import the class),
and checks that every copy predicts exactly what the original does.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from torch import nn

from torchkeep._table import format_bytes
from torchkeep.checkpoint import load_checkpoint, save_checkpoint
from torchkeep.cli.inspect import summary_table
from torchkeep.diff import diff
from torchkeep.formats import detect_format
from torchkeep.heads import replace_head
from torchkeep.loading import load_into
from torchkeep.models import save_model
from torchkeep.modes import evaluating
from torchkeep.run import Checkpointer
from torchkeep.summary import summarize
from torchkeep.transfer import freeze, param_groups
from torchkeep.tutorial import TheModelClass, digits_dataset
from torchkeep.weights import save_weights

__all__ = ["demo_command"]

# Runs in a fresh interpreter: torch and torchkeep only, never the tutorial module.
_FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch, torchkeep
    from safetensors.torch import load_file, save_file
    model = torchkeep.load_model(sys.argv[1])
    assert "torchkeep.tutorial" not in sys.modules, "the model class was imported"
    inputs = load_file(sys.argv[2])["x"]
    with torchkeep.evaluating(model):
        save_file({"y": model(inputs).contiguous()}, sys.argv[3])
    print(type(model).__name__, "training" if model.training else "eval")
    """
)


@dataclass
class _Checks:
    rows: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, console: Console, name: str, ok: bool, detail: str = "") -> None:
        self.rows.append((name, ok, detail))
        mark = "[green]✓[/]" if ok else "[bold red]✗[/]"
        console.print(
            f"  {mark} {escape(name)}" + (f" [dim]({escape(detail)})[/]" if detail else ""), highlight=False
        )

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.rows)


@contextmanager
def _step(console: Console, number: int, title: str) -> Iterator[None]:
    console.rule(f"[bold]{number}/8 {title}", align="left")
    start = time.perf_counter()
    yield
    console.print(f"  [dim]{time.perf_counter() - start:.1f} s[/]")


_COLUMNS = (
    SpinnerColumn(),
    TextColumn("{task.description}"),
    BarColumn(),
    MofNCompleteColumn(),
    TimeElapsedColumn(),
)
_BATCH = 64


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: tuple[torch.Tensor, torch.Tensor],
    progress: Progress,
    label: str,
) -> float:
    """One epoch in a shuffled order drawn from the global RNG; the mean loss."""
    images, labels = data
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    order = torch.randperm(len(images))
    batches = len(order) // _BATCH
    task = progress.add_task(label, total=batches)
    total = 0.0
    for i in range(batches):
        idx = order[i * _BATCH : (i + 1) * _BATCH]
        optimizer.zero_grad()
        loss = loss_fn(model(images[idx]).squeeze(1), labels[idx])
        loss.backward()
        optimizer.step()
        total += loss.item()
        progress.advance(task)
    progress.remove_task(task)
    return total / max(1, batches)


def _train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    console: Console,
) -> float:
    last_loss = float("nan")
    with Progress(*_COLUMNS, console=console, transient=True) as progress:
        for epoch in range(epochs):
            last_loss = _train_epoch(model, optimizer, data, progress, f"epoch {epoch + 1}/{epochs}")
            console.print(
                f"  epoch {epoch + 1}: loss {last_loss:.4f}, test accuracy {_accuracy(model, test):.1%}"
            )
    return last_loss


def _validation_loss(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    with evaluating(model):
        return float(
            nn.functional.binary_cross_entropy_with_logits(model(test[0]).squeeze(1), test[1]).item()
        )


def _resume_walkthrough(
    workdir: Path,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    seed: int,
    checks: _Checks,
    console: Console,
) -> None:
    """Train straight through; train again, stop half way, resume in new objects; compare the losses."""
    run_dir = workdir / "run"
    straight: list[float] = []
    resumed: list[float] = []
    with Progress(*_COLUMNS, console=console, transient=True) as progress:
        torch.manual_seed(seed + 1)
        model = TheModelClass()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for epoch in range(epochs):
            straight.append(
                _train_epoch(model, optimizer, train, progress, f"uninterrupted, epoch {epoch + 1}")
            )

        torch.manual_seed(seed + 1)
        model = TheModelClass()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        ckpts = Checkpointer(run_dir, keep_last=2, keep_best=1, monitor="val_loss")
        stop = max(1, epochs // 2)

        def epoch_and_save(epoch: int, label: str) -> None:
            resumed.append(_train_epoch(model, optimizer, train, progress, f"{label}, epoch {epoch + 1}"))
            metrics = {"val_loss": _validation_loss(model, test), "train_loss": resumed[-1]}
            ckpts.save(epoch, model=model, optimizer=optimizer, epoch=epoch, metrics=metrics)

        for epoch in range(stop):
            epoch_and_save(epoch, "interrupted run")
        console.print(
            f"  [yellow]interrupted after epoch {stop}[/]; "
            f"a new model and optimizer resume from {run_dir.name}/"
        )
        torch.manual_seed(12345)  # as a new process would: other weights, other random state

        model = TheModelClass()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        info = Checkpointer(run_dir, keep_last=2, keep_best=1, monitor="val_loss").restore(
            model=model, optimizer=optimizer
        )
        start = 0 if info is None else int(info.step or 0) + 1
        for epoch in range(start, epochs):
            epoch_and_save(epoch, "resumed run")

    table = Table(show_edge=False, header_style="bold")
    for column in ("epoch", "uninterrupted loss", "interrupted + resumed loss"):
        table.add_column(column, justify="right")
    for epoch, (a, b) in enumerate(zip(straight, resumed, strict=True)):
        note = " (resumed)" if epoch == start else ""
        table.add_row(str(epoch + 1), f"{a:.6f}", f"{b:.6f}{note}")
    console.print(table)
    checks.add(
        console,
        "resumed run continues exactly (bitwise equal losses)",
        straight == resumed,
        f"restored {', '.join(info.restored) if info else 'nothing'} from epoch {start}",
    )

    best = ckpts.best
    console.print(
        "  kept: "
        + ", ".join(f"{e.name} (val_loss {e.metrics['val_loss']:.4f})" for e in ckpts.list())
        + f"; best: {Path(best).name if best else '-'}"
    )
    best_model = TheModelClass()
    best_info = ckpts.restore(model=best_model, path=best, restore_rng=False) if best else None
    ok = (
        best_info is not None
        and abs(_validation_loss(best_model, test) - best_info.metrics["val_loss"]) < 1e-6
    )
    checks.add(
        console,
        "best checkpoint picked and restored",
        ok,
        f"epoch {best_info.epoch + 1 if best_info and best_info.epoch is not None else '?'}, "
        f"test accuracy {_accuracy(best_model, test):.1%}",
    )


def _picture_of_the_run(workdir: Path, checks: _Checks, console: Console) -> None:
    """``torchkeep ls run --plot metrics.png``: the run's metrics over its steps, best and kept marked."""
    from torchkeep.errors import MissingExtraError
    from torchkeep.plots import plot_metrics

    run_dir, picture = workdir / "run", workdir / "metrics.png"
    try:
        plot_metrics(run_dir, picture, monitor="val_loss", mode="min")
    except MissingExtraError as err:  # matplotlib is optional: say how to get the picture, fail nothing
        console.print(f"  [yellow]no picture of the run[/]: {err}")
        return
    whole = picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checks.add(
        console,
        "picture of the run drawn (torchkeep ls run --plot metrics.png)",
        whole,
        f"{picture}, {format_bytes(picture.stat().st_size)}",
    )


# A training job that SIGTERM stops: run by _preemption_walkthrough as JOB RUN_DIR STEPS.
_PREEMPTIBLE_JOB_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torchkeep
    from safetensors.torch import save_file
    from torch import nn
    run, steps = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torchkeep.Checkpointer(run, keep_last=2, preemption=True) as ckpts:
        info = ckpts.restore(model=model, optimizer=optimizer)
        for step in range(0 if info is None else info.step + 1, steps):
            batch = torch.randint(0, 256, (32,))  # the global RNG: restored exactly
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            stop = ckpts.preempted
            if step % 50 == 49 or stop or step == steps - 1:
                ckpts.save(step, model=model, optimizer=optimizer)
            print("step", step, flush=True)
            if stop:
                print("saved", step, ckpts.preemption.received, flush=True)
                sys.exit(0)
    save_file(dict(model.state_dict()), run + "/final.safetensors")
    """
)


def _preemption_walkthrough(workdir: Path, *, checks: _Checks, console: Console) -> None:
    """A job gets SIGTERM mid-training, saves, exits 0; resumed, it ends where a job never stopped ends."""
    from safetensors.torch import load_file

    def job(run: Path, steps: int) -> subprocess.Popen[str]:
        command = [sys.executable, "-c", _PREEMPTIBLE_JOB_SCRIPT, str(run), str(steps)]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    detail, ok = "", False
    with console.status("  a training job, SIGTERM, a resumed job and one never stopped"):
        first = job(workdir / "preempted", 10**9)  # would train for ever
        for line in first.stdout or []:
            if line.strip() == "step 20":
                break
        first.send_signal(signal.SIGTERM)  # as Kubernetes, a spot instance or SLURM would
        out, err = first.communicate(timeout=300)  # reading on: a full pipe would block the job
        last = out.strip().splitlines()[-1:] or [err.strip()[-200:]]
        if first.returncode == 0 and last[0].startswith("saved "):
            stopped = int(last[0].split()[1])
            until = stopped + 20
            resumed, straight = job(workdir / "preempted", until), job(workdir / "straight", until)
            for other in (resumed, straight):
                other.communicate(timeout=300)
            codes = [resumed.returncode, straight.returncode]
            a = load_file(str(workdir / "preempted" / "final.safetensors")) if codes == [0, 0] else {}
            b = load_file(str(workdir / "straight" / "final.safetensors")) if codes == [0, 0] else {}
            ok = bool(a) and sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b)
            detail = f"SIGTERM at step {stopped}: saved it, exit 0; resumed to step {until - 1}"
        else:
            detail = f"the job exited {first.returncode}: {last[0]}"
    console.print(
        "  [dim]Checkpointer(..., preemption=True): the handler only records the signal; the loop reads "
        "ckpts.preempted once per step, saves that step and stops.[/]"
    )
    checks.add(console, "preempted by SIGTERM: saved, exit 0, resumed exactly (bitwise)", ok, detail)


def _accuracy(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    images, labels = test
    with evaluating(model):
        predicted = (model(images).squeeze(1) > 0).float()
    return float((predicted == labels).float().mean().item())


def _predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with evaluating(model):
        outputs: torch.Tensor = model(images)
    return outputs


def _fresh_process_outputs(pt2: Path, images: torch.Tensor, workdir: Path) -> tuple[torch.Tensor, str]:
    from safetensors.torch import load_file, save_file

    inputs, outputs = workdir / ".demo-inputs.safetensors", workdir / ".demo-outputs.safetensors"
    save_file({"x": images.contiguous()}, str(inputs))
    try:
        done = subprocess.run(
            [sys.executable, "-c", _FRESH_PROCESS_SCRIPT, str(pt2), str(inputs), str(outputs)],
            capture_output=True,
            text=True,
            cwd=workdir,
            check=False,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
        return load_file(str(outputs))["y"], done.stdout.strip()
    finally:
        inputs.unlink(missing_ok=True)
        outputs.unlink(missing_ok=True)


def demo_command(
    out: Path | None = typer.Option(
        None, "--out", help="Keep the files in this folder (default: a temp folder)."
    ),
    epochs: int = typer.Option(3, "--epochs", min=1, help="Training epochs."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
) -> None:
    """Walk through saving and loading a model for real: weights, whole model, checkpoint."""
    console = Console(highlight=False)
    started = time.perf_counter()
    if out is None:
        with tempfile.TemporaryDirectory(prefix="torchkeep-demo-") as tmp:
            passed = _run(Path(tmp), epochs=epochs, seed=seed, console=console)
    else:
        out.mkdir(parents=True, exist_ok=True)
        passed = _run(out, epochs=epochs, seed=seed, console=console)
    elapsed = time.perf_counter() - started
    if passed:
        console.print(f"[bold green]All checks passed[/] in {elapsed:.1f} s.")
    else:
        console.print(f"[bold red]Some checks failed[/] ({elapsed:.1f} s).")
        raise typer.Exit(1)


def _ten_class_digits(
    seed: int,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """10 training images per digit and a test set, for the 0-9 task (labels 0..9)."""
    images, _, _ = digits_dataset(seed=seed)
    try:
        from sklearn.datasets import load_digits

        labels = torch.tensor(load_digits().target)
    except ImportError:  # the synthetic stand-in has two classes only
        labels = torch.arange(len(images)) % 2
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    classes = int(labels.max()) + 1
    few = torch.cat([order[labels[order] == c][:10] for c in range(classes)])
    rest = torch.ones(len(images), dtype=torch.bool)
    rest[few] = False
    return (images[few], labels[few]), (images[rest], labels[rest])


def _fit_classes(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], epochs: int) -> None:
    optimizer = torch.optim.Adam(param_groups(model, lr=1e-3))
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for idx in torch.split(torch.randperm(len(data[0])), 32):
            optimizer.zero_grad()
            loss = loss_fn(model(data[0][idx]), data[1][idx])
            loss.backward()
            optimizer.step()


def _class_accuracy(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    with evaluating(model):
        return float((model(test[0]).argmax(1) == test[1]).float().mean().item())


def _transfer_walkthrough(
    weights: Path, workdir: Path, *, seed: int, checks: _Checks, console: Console
) -> None:
    """Reuse the trained model's features for a new task: which digit (0-9) from 10 images each."""
    few, test = _ten_class_digits(seed)
    classes = int(test[1].max()) + 1
    torch.manual_seed(seed + 2)
    model = TheModelClass()
    load_into(model, weights)
    replace_head(model, classes, attr="fc2")
    report = freeze(model, "conv", "bn")
    table = Table(show_edge=False, header_style="bold")
    for column in ("layer", "parameters", "state"):
        table.add_column(column)
    for name, module in model.named_children():
        params = list(module.parameters())
        if params:
            frozen = not any(p.requires_grad for p in params)
            state = "[cyan]frozen[/]" + (" (eval mode, statistics fixed)" if name == "bn" else "")
            table.add_row(name, f"{sum(p.numel() for p in params):,}", state if frozen else "trainable")
    console.print(table)
    console.print(f"  {escape(str(report))}")
    _fit_classes(model, few, epochs=30)
    save_weights(model, workdir / "digits10.safetensors")
    torch.manual_seed(seed + 2)
    scratch = replace_head(TheModelClass(), classes, attr="fc2")
    _fit_classes(scratch, few, epochs=30)
    console.print(
        f"  {len(few[0])} training images, {len(test[0])} test images: "
        f"fine-tuned {_class_accuracy(model, test):.1%}, "
        f"same model trained from scratch {_class_accuracy(scratch, test):.1%}"
    )
    changed = {c.key for c in diff(weights, workdir / "digits10.safetensors").changed}
    backbone = {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}
    checks.add(
        console,
        "frozen backbone bitwise unchanged after fine-tuning (torchkeep diff)",
        not (changed & backbone),
        f"changed: {', '.join(sorted(changed))}",
    )


def _run(workdir: Path, *, epochs: int, seed: int, console: Console) -> bool:
    torch.manual_seed(seed)
    checks = _Checks()
    console.print(f"[bold]torchkeep demo[/] — files go to {escape(str(workdir))}")

    with _step(console, 1, "data"):
        images, labels, name = digits_dataset(seed=seed)
        order = torch.randperm(len(images))
        split = int(0.8 * len(images))
        train = (images[order[:split]], labels[order[:split]])
        test = (images[order[split:]], labels[order[split:]])
        console.print(
            f"  {name}: {len(train[0])} training and {len(test[0])} test images, 3x26x26; "
            "task: is the digit ≥ 5?"
        )

    with _step(console, 2, "the model: parameters and buffers"):
        model = TheModelClass()
        summary = summarize(model)
        console.print(summary_table(summary))
        console.print(f"  {summary.totals_line()}")
        console.print(
            "  [dim]Buffers (BatchNorm's running statistics) are in the state dict but not trained: "
            "save the state dict, not model.parameters().[/]"
        )

    with _step(console, 3, "train"):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss = _train(model, optimizer, train, test, epochs=epochs, console=console)

    files = {
        "weights (safetensors)": workdir / "model.safetensors",
        "weights (torch.save)": workdir / "model.pt",
        "whole model (torch.export)": workdir / "model.pt2",
        "checkpoint": workdir / "checkpoint.tar",
    }
    with _step(console, 4, "save"):
        save_weights(model, files["weights (safetensors)"], metadata={"dataset": name, "epochs": str(epochs)})
        save_weights(model, files["weights (torch.save)"])
        save_model(
            model,
            files["whole model (torch.export)"],
            example_inputs=(test[0][:2],),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        )
        save_checkpoint(
            files["checkpoint"],
            model=model,
            optimizer=optimizer,
            epoch=epochs - 1,
            loss=loss,
            metrics={"test_accuracy": _accuracy(model, test)},
        )
        for what, path in files.items():
            console.print(f"  {what:<28} {path.name:<18} {format_bytes(path.stat().st_size):>10}")

    reference = _predict(model, test[0])
    with _step(console, 5, "load each file back and compare predictions (eval mode)"):
        _verify(model, optimizer, files, test[0], reference, workdir, checks, console)

    with _step(console, 6, "checkpoints: interrupt, resume exactly, keep the best"):
        _resume_walkthrough(workdir, train, test, epochs=epochs, seed=seed, checks=checks, console=console)
        _picture_of_the_run(workdir, checks, console)
        _preemption_walkthrough(workdir, checks=checks, console=console)

    with _step(console, 7, "transfer learning: new head, frozen backbone, fine-tune"):
        _transfer_walkthrough(
            files["weights (safetensors)"], workdir, seed=seed, checks=checks, console=console
        )

    with _step(console, 8, "summary"):
        table = Table(show_edge=False, header_style="bold")
        for column in ("file", "format", "size"):
            table.add_column(column)
        for path in files.values():
            table.add_row(path.name, detect_format(path).value, format_bytes(path.stat().st_size))
        console.print(table)
        failed = [n for n, ok, _ in checks.rows if not ok]
        console.print(
            f"  {len(checks.rows) - len(failed)}/{len(checks.rows)} checks passed"
            + (f"; failed: {', '.join(failed)}" if failed else "")
        )
    return checks.passed


def _verify(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    files: dict[str, Path],
    images: torch.Tensor,
    reference: torch.Tensor,
    workdir: Path,
    checks: _Checks,
    console: Console,
) -> None:
    fresh = TheModelClass()
    report = load_into(fresh, files["weights (safetensors)"])
    checks.add(
        console,
        "safetensors → load_into → same predictions",
        report.ok and torch.equal(_predict(fresh, images), reference),
        report.headline(),
    )

    plain = TheModelClass()
    plain.load_state_dict(torch.load(files["weights (torch.save)"], weights_only=True))
    checks.add(
        console,
        ".pt → plain torch.load(weights_only=True) → same predictions",
        torch.equal(_predict(plain, images), reference),
    )

    with console.status("  loading model.pt2 in a fresh Python process without TheModelClass…"):
        try:
            outputs, said = _fresh_process_outputs(files["whole model (torch.export)"], images, workdir)
            ok, detail = torch.equal(outputs, reference), f"fresh process: {said}"
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            ok, detail = False, str(err)
    checks.add(console, ".pt2 → load_model in a fresh process → same predictions", ok, detail)

    resumed = TheModelClass()
    resumed_opt = torch.optim.Adam(resumed.parameters(), lr=1e-3)
    info = load_checkpoint(files["checkpoint"], model=resumed, optimizer=resumed_opt)
    same_state = all(
        torch.equal(a["exp_avg"], b["exp_avg"])
        for a, b in zip(
            optimizer.state_dict()["state"].values(), resumed_opt.state_dict()["state"].values(), strict=True
        )
    )
    checks.add(
        console,
        "checkpoint → model + optimizer restored",
        torch.equal(_predict(resumed, images), reference) and same_state,
        f"epoch {info.epoch}, loss {info.loss:.4f}, metrics {info.metrics}",
    )

    model.train()
    with evaluating(model):
        twice_equal = torch.equal(model(images[:8]), model(images[:8]))
    checks.add(
        console,
        "evaluating(): Dropout off inside, training mode restored after",
        twice_equal and model.training and all(m.training for m in model.modules()),
    )
