"""MTAdam in a PyTorch Lightning module (manual optimization).

    pip install lightning        # or: pip install -e ".[lightning]"
    python examples/lightning_mtadam.py --max-steps 200

MTAdam computes the per-term gradients itself, so the module turns automatic
optimization off and hands the loss terms to the optimizer: Lightning's
``LightningOptimizer.step(closure=...)`` calls ``MTAdam.step(closure=...)``, whose closure
returns the terms (no ``manual_backward``). Going through ``self.optimizers()`` keeps
Lightning's step counter (``max_steps``) and its strategies working: under
``Trainer(strategy="ddp")`` MTAdam averages the per-term gradients over the ranks itself.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lossbalance


class MTAdamModule(L.LightningModule):
    """A regressor trained on two terms of very different scales, balanced by MTAdam."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.lr = lr
        self.model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        out = self.model(x)
        losses = [
            (out[:, 0] - y[:, 0]).pow(2).mean(),  # term 0: the anchor
            1000.0 * (out[:, 1] - y[:, 1]).abs().mean(),  # any scale: MTAdam rescales it
        ]
        opt = self.optimizers()
        opt.step(closure=lambda: losses)  # per-term gradients and the update, in one call
        self.log_dict({f"loss/{i}": loss.detach() for i, loss in enumerate(losses)})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return lossbalance.MTAdam(self.parameters(), lr=self.lr)


def loader(n: int = 512, batch: int = 32) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=gen)
    y = torch.stack([x[:, :4].sum(1), torch.sin(2 * x[:, 4])], 1)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, generator=gen)


def build() -> tuple[MTAdamModule, DataLoader]:
    torch.manual_seed(0)
    return MTAdamModule(), loader()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=200)
    args = parser.parse_args()
    module, data = build()
    trainer = L.Trainer(
        max_steps=args.max_steps, accelerator="cpu", logger=False, enable_checkpointing=False
    )
    trainer.fit(module, data)
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}
    print(f"trained {trainer.global_step} steps; {metrics}")


if __name__ == "__main__":
    main()
