"""A site-local Task: images in class folders, read through a torch Dataset, trained by a small CNN.

Layout of a data folder (one per site; the same layout for the shared test folder)::

    DIR/<class name>/<any name>.png

Every site and the coordinator must agree on the class list, so it is a task option (``classes=a,b,c``) rather
than whatever folders a site happens to have; a site without images of some class is fine. Images are read with
Pillow, converted to grey, resized to ``size`` x ``size`` and scaled to [0, 1].

Run it (from the repository root, so ``examples`` is importable)::

    # coordinator: evaluates the global model on a test folder of its own
    PYTHONPATH=. fedopt coordinator --bind tcp://0.0.0.0:5555 --keys keys --task examples.image_folder:ImageFolderTask \\
        --task-option classes=circle,square,stripes --task-option test_path=/data/test --clients 3 --rounds 20
    # each site, on its own machine, with its own folder
    PYTHONPATH=. fedopt client --connect tcp://HOST:5555 --keys keys --key-name client-000 --id site-a \\
        --data /data/site-a
    # the same task simulated on one machine from one folder, split among 3 clients
    PYTHONPATH=. fedopt simulate --task examples.image_folder:ImageFolderTask --task-option data_path=/data/all \\
        --task-option classes=circle,square,stripes --task-option test_path=/data/test --clients 3 --partition iid
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from fedopt.data import DatasetTask
from fedopt.errors import DataError

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


class ImageFolder(Dataset):
    """``(image, label)`` items from ``root/<class>/<file>``; ``targets`` lists the labels without decoding."""

    def __init__(self, root: str | Path, classes: list[str], size: int) -> None:
        self.root, self.classes, self.size = Path(root), classes, size
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist or is not a directory")
        unknown = sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name not in classes)
        if unknown:
            raise DataError(f"{self.root} has class folders the task does not know: {', '.join(unknown)} "
                            f"(classes: {', '.join(classes)})")
        self.files: list[Path] = []
        self.targets: list[int] = []
        for label, name in enumerate(classes):
            for f in sorted((self.root / name).glob("*")) if (self.root / name).is_dir() else ():
                if f.suffix.lower() in SUFFIXES:
                    self.files.append(f)
                    self.targets.append(label)
        if not self.files:
            raise DataError(f"no images under {self.root} (expected {self.root}/<class>/<file>.png)")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(self.files[i]) as img:
            grey = img.convert("L").resize((self.size, self.size))
            x = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)
        return x.unsqueeze(0), self.targets[i]


class ImageFolderTask(DatasetTask):
    """Options: ``data_path`` (this site's folder, or all the data in simulation), ``test_path`` (a shared test
    folder, optional), ``classes`` (comma-separated; default: the folder names under data_path or test_path),
    ``size`` (pixels a side, default 16)."""

    name = "image-folder"

    def __init__(self, data_path: str | None = None, test_path: str | None = None, classes: str | None = None,
                 size: int = 16) -> None:
        super().__init__()
        self.data_path, self.test_path, self.size = data_path, test_path, int(size)
        if classes is None:
            where = next((Path(p) for p in (data_path, test_path) if p), None)
            if where is None or not where.is_dir():
                raise DataError("image-folder needs classes=a,b,... or a data_path/test_path folder to read them from")
            classes = ",".join(sorted(p.name for p in where.iterdir() if p.is_dir()))
        self.classes = [c for c in str(classes).split(",") if c]
        if len(self.classes) < 2:
            raise DataError(f"image-folder needs at least 2 classes, got {self.classes}")

    def build_model(self) -> nn.Module:
        s = self.size // 4
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * s * s, len(self.classes)),
        )

    def datasets(self, seed: int):
        if self.data_path is None:
            raise DataError("image-folder needs data_path (fedopt client --data DIR, or --task-option data_path=DIR)")
        return ImageFolder(self.data_path, self.classes, self.size), self.load_test(seed)

    def load_test(self, seed: int):
        if self.test_path is None:
            return None
        return ImageFolder(self.test_path, self.classes, self.size)
