"""The image training loops people write, for the bench's `images` case: both train the same model
class with the same optimizer, schedule, batch, loss and augmentation as hpcml, in plain PyTorch.

- `run_folder`: torchvision-style. An ImageFolder-like Dataset opens and decodes each PNG with PIL
  in `__getitem__`, crops/flips it with NumPy, and a DataLoader with one worker per core batches it.
  (torchvision itself does not import beside this machine's CPU torch build; this is its recipe.)
- `run_tensor`: the whole set decoded once into a float tensor in memory; per batch, a random flip
  and a padded random crop per image with torch ops; a plain loop.

Both time the training epochs only (evaluation excluded), as hpcml's `step_seconds` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hpcml.bench.timers import now


def _model_and_optim(spec: dict[str, Any], input_shape, classes: int, steps: int, seed: int):
    from hpcml.models.registry import create_model

    torch.manual_seed(seed)
    model = create_model(
        spec["model"], input_shape=input_shape, num_outputs=classes, trust_code=False, **spec["model_kw"]
    )
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec["lr"], total_steps=steps, pct_start=0.25)
    return model, opt, sched, nn.CrossEntropyLoss(label_smoothing=0.1)


def _train(model, opt, sched, loss_fn, batches, epochs: int, evaluate) -> dict[str, Any]:
    seconds, seen = 0.0, 0
    for epoch in range(epochs):
        model.train()
        t0 = now()
        for xb, yb in batches(epoch):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()
            sched.step()
            seen += len(yb)
        seconds += now() - t0
    return {"train_seconds": seconds, "images_per_second": seen / seconds, "test_accuracy": evaluate()}


class FolderDataset(torch.utils.data.Dataset):
    """ImageFolder's recipe: (path, class) pairs; PIL decode, crop/flip and normalize per sample."""

    def __init__(self, files: list[tuple[str, int]], mean: float, std: float, pad: int, train: bool):
        self.files, self.mean, self.std, self.pad, self.train = files, mean, std, pad, train

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.files[i]
        with Image.open(path) as img:
            a = np.asarray(img.convert("RGB"), np.float32).transpose(2, 0, 1)
        if self.train:
            p = self.pad
            h, w = a.shape[1:]
            padded = np.zeros((3, h + 2 * p, w + 2 * p), np.float32)
            padded[:, p : p + h, p : p + w] = a
            dy, dx = np.random.randint(0, 2 * p + 1, 2)
            a = padded[:, dy : dy + h, dx : dx + w]
            if np.random.rand() < 0.5:
                a = a[:, :, ::-1]
        return torch.from_numpy((np.ascontiguousarray(a) - self.mean) / self.std), label


def folder_files(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(str(f), k) for k, c in enumerate(classes) for f in sorted((root / c).glob("*.png"))]
    return files, classes


def run_folder(
    spec: dict[str, Any], train_files, test_files, *, epochs: int, seed: int, threads: int
) -> dict:
    torch.set_num_threads(threads)
    mean, std, pad, bs = spec["mean"], spec["std"], spec["crop_padding"], spec["batch_size"]
    loader = torch.utils.data.DataLoader(
        FolderDataset(train_files, mean, std, pad, True), batch_size=bs, shuffle=True,
        num_workers=threads, persistent_workers=True, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    test = torch.utils.data.DataLoader(FolderDataset(test_files, mean, std, pad, False), batch_size=256)
    shape = tuple(next(iter(test))[0].shape[1:])
    model, opt, sched, loss_fn = _model_and_optim(spec, shape, spec["classes"], epochs * len(loader), seed)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            hits = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in test)
        return hits / len(test_files)

    return _train(model, opt, sched, loss_fn, lambda _e: loader, epochs, evaluate)


def run_tensor(spec: dict[str, Any], data: tuple[np.ndarray, ...], *, epochs: int, seed: int, threads: int):
    torch.set_num_threads(threads)
    x_tr, y_tr, x_te, y_te = data
    norm = lambda a: (torch.from_numpy(a).float() - spec["mean"]) / spec["std"]  # noqa: E731
    x, y, xt, yt = norm(x_tr), torch.from_numpy(y_tr), norm(x_te), torch.from_numpy(y_te)
    bs, p = spec["batch_size"], spec["crop_padding"]
    steps = -(-len(x) // bs)
    model, opt, sched, loss_fn = _model_and_optim(
        spec, tuple(x.shape[1:]), spec["classes"], epochs * steps, seed
    )
    g = torch.Generator().manual_seed(seed)
    h, w = x.shape[2:]

    def batches(_epoch: int):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), bs):
            idx = perm[s : s + bs]
            xb = nn.functional.pad(x[idx], (p, p, p, p))
            off = torch.randint(0, 2 * p + 1, (len(idx), 2), generator=g).tolist()
            xb = torch.stack([xb[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(off)])
            flip = torch.rand(len(idx), generator=g) < 0.5
            yield torch.where(flip[:, None, None, None], xb.flip(3), xb), y[idx]

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            hits = sum(
                int((model(xt[i : i + 256]).argmax(1) == yt[i : i + 256]).sum())
                for i in range(0, len(xt), 256)
            )
        return hits / len(xt)

    return _train(model, opt, sched, loss_fn, batches, epochs, evaluate)
