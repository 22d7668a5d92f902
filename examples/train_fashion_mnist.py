"""Train the embedded default model: a small ResNet on Fashion-MNIST, exported to OpenVINO IR.

Where it sits in the data flow: this script is run once by a maintainer; its output
(``apsq_ov/data/fmnist_resnet.xml/.bin``) is committed and is the model ``apsq-ov demo``
calibrates. It is the only place apsq-ov uses PyTorch (``pip install torch==2.13.0``).

The model takes float32 images in [0, 1] shaped (N, 1, 28, 28); normalisation lives inside the
graph, so shifted copies of the data (darkening, contrast, noise) are plain array operations.

Run: ``python examples/train_fashion_mnist.py [--epochs 6] [--out apsq_ov/data]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from apsq_ov.datasets import load_fashion_mnist

MEAN, STD = 0.2860, 0.3530


def build_model():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.skip = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + self.skip(x))

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.layers = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 48, 2))
            self.fc = nn.Linear(48, 10)

        def forward(self, x):
            x = (x - MEAN) / STD
            x = self.layers(self.stem(x))
            return self.fc(x.mean(dim=(2, 3)))

    return ResNet()


def main() -> None:
    import openvino as ov
    import torch
    import torch.nn.functional as F

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "apsq_ov" / "data")
    args = parser.parse_args()

    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(2)
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train.astype(np.int64))
    model = build_model()
    print(f"params: {sum(p.numel() for p in model.parameters())}")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = args.epochs * (len(xt) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(len(xt) // 128):
            idx = perm[i * 128 : (i + 1) * 128]
            xb = xt[idx]
            # light augmentation: random horizontal flip
            flip = torch.rand(len(xb), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(torch.from_numpy(x_test[j : j + 1000])).argmax(1) for j in range(0, 10000, 1000)])
        acc = float((pred.numpy() == y_test).mean())
        print(f"epoch {epoch + 1}: loss {loss.item():.3f} test acc {acc:.4f} ({time.time() - t0:.0f} s)")

    model.eval()
    ov_model = ov.convert_model(model, example_input=torch.zeros(1, 1, 28, 28), input=[-1, 1, 28, 28])
    ov_model.inputs[0].get_tensor().set_names({"images"})
    ov_model.outputs[0].get_tensor().set_names({"logits"})
    args.out.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov_model, args.out / "fmnist_resnet.xml", compress_to_fp16=False)
    print(f"saved {args.out / 'fmnist_resnet.xml'} (test accuracy {acc:.4f})")


if __name__ == "__main__":
    main()
