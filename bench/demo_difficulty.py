"""Is the demo cohort learnable but not trivial? Train a ResNet18 on all real demo patches.

Usage: python bench/demo_difficulty.py [results/demo/patches.zarr] [epochs]
Prints test accuracy and balanced accuracy of a randomly initialised ResNet18 trained on the
training split (flips as augmentation), next to the majority-class baseline.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from histodistill.io import save_figures
from histodistill.store import PatchStore


def main(path: str = "results/demo/patches.zarr", epochs: int = 8, seed: int = 0) -> None:
    torch.manual_seed(seed)
    store = PatchStore(path)
    tr, te = store.indices("train"), store.indices("test")
    label = torch.from_numpy(store.array("label"))
    x_tr = torch.from_numpy(store.patches(tr)).float() / 255
    x_te = torch.from_numpy(store.patches(te)).float() / 255
    y_tr, y_te = label[tr], label[te]
    net = torchvision.models.resnet18(weights=None, num_classes=len(store.class_names))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    for epoch in range(epochs):
        net.train()
        for batch in torch.randperm(len(x_tr), generator=gen).split(64):
            xb = x_tr[batch]
            if torch.rand(1, generator=gen) < 0.5:
                xb = xb.flip(3)
            loss = torch.nn.functional.cross_entropy(net(xb), y_tr[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(b).argmax(1) for b in x_te.split(256)])
    acc = (pred == y_te).float().mean().item()
    recalls = [(pred[y_te == c] == c).float().mean().item() for c in y_te.unique()]
    majority = y_te.bincount().max().item() / len(y_te)
    print(f"train {len(tr)} test {len(te)} patches; classes {store.class_names}")
    figures = [f"resnet18_test_acc: {acc:.4f}", f"resnet18_balanced_acc: {np.mean(recalls):.4f}",
               f"majority_baseline_acc: {majority:.4f}"]
    save_figures(figures, Path("results/bench/demo_difficulty.txt"))


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["results/demo/patches.zarr"]), *(int(a) for a in sys.argv[2:3]))
