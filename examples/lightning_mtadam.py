"""MTAdam in a PyTorch Lightning module: ``training_step`` returns the loss terms.

    pip install lightning        # or: pip install -e ".[lightning]"
    python examples/lightning_mtadam.py --max-steps 200

``lossbalance.lightning.MultiTermModule`` is a ``LightningModule`` whose ``training_step``
may return the terms (anchor first). In automatic optimization its ``backward`` hook
passes them to ``MTAdam.accumulate`` (divided by ``accumulate_grad_batches``) and
Lightning's ``optimizer.step(closure)`` applies the update, so Lightning's step counter,
callbacks and gradient accumulation work as usual. In manual optimization
(``self.automatic_optimization = False``), call ``self.optimizers().step(losses)``.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lossbalance
from lossbalance.lightning import MultiTermModule


class MTAdamModule(MultiTermModule):
    """A regressor trained on two terms of very different scales, balanced by MTAdam."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> list[torch.Tensor]:
        x, y = batch
        out = self.model(x)
        losses = [
            (out[:, 0] - y[:, 0]).pow(2).mean(),  # term 0: the anchor
            1000.0 * (out[:, 1] - y[:, 1]).abs().mean(),  # any scale: MTAdam rescales it
        ]
        self.log_dict({f"loss/{i}": loss.detach() for i, loss in enumerate(losses)})
        return losses  # MTAdam computes the per-term gradients: no backward here

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
