"""A balancer in a PyTorch Lightning module: ``training_step`` returns the loss terms.

    pip install lightning        # or: pip install -e ".[lightning]"
    python examples/lightning_balancer.py --max-steps 200 --method imtl
    python examples/lightning_balancer.py --manual    # the same with manual optimization

``lossbalance.lightning.MultiTermModule``: ``training_step`` returns
``Terms(losses, shared=..., features=...)`` and the module's ``backward`` hook calls
``lossbalance.backward(losses, self.balancer, shared=..., features=...)``, which writes the
balanced ``.grad`` (shared trunk: the balancer's combination of the per-term gradients;
heads: their own term's gradient); Lightning's optimizer step applies it. In manual
optimization ``lossbalance.backward`` replaces ``manual_backward``. The balancer is a
submodule, so its learnable weights (hybrid IMTL's scales, GradNorm's task weights) are in
``self.parameters()`` and its running state is saved in Lightning's checkpoints. Under
``Trainer(precision="16-mixed")`` the automatic path scales the terms with Lightning's
``GradScaler`` (in manual optimization pass
``grad_scaler=self.trainer.precision_plugin.scaler``).
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lossbalance
from lossbalance.lightning import MultiTermModule, Terms


class BalancedModule(MultiTermModule):
    """A shared trunk with a regression, an L1 and a classification head."""

    def __init__(self, method: str = "imtl", lr: float = 3e-3, manual: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = not manual
        self.lr = lr
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(32, 1), nn.Linear(32, 1), nn.Linear(32, 4)])
        self.balancer = lossbalance.create(method, 3)  # built once: its state persists

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> Terms | None:
        x, y, c = batch
        z = self.trunk(x)
        losses = [
            (self.heads[0](z).squeeze(1) - y[:, 0]).pow(2).mean(),
            100.0 * (self.heads[1](z).squeeze(1) - y[:, 1]).abs().mean(),
            nn.functional.cross_entropy(self.heads[2](z), c),
        ]
        self.log_dict({f"loss/{i}": loss.detach() for i, loss in enumerate(losses)})
        if self.automatic_optimization:
            return Terms(losses, shared=self.trunk, features=z)
        opt = self.optimizers()
        opt.zero_grad()
        lossbalance.backward(losses, self.balancer, shared=self.trunk, features=z)
        opt.step()
        return None

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        weights = self.balancer.last_weights  # those of the step just taken
        if weights is not None:
            self.log_dict({f"weight/{i}": float(w) for i, w in enumerate(weights)})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loader(n: int = 512, batch: int = 32) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=gen)
    y = torch.stack([x[:, :4].sum(1), torch.sin(3 * x[:, 4])], 1)
    c = (x[:, 5] > 0).long() + 2 * (x[:, 6] > 0).long()
    return DataLoader(TensorDataset(x, y, c), batch_size=batch, shuffle=True, generator=gen)


def build(method: str = "imtl", manual: bool = False) -> tuple[BalancedModule, DataLoader]:
    torch.manual_seed(0)
    return BalancedModule(method, manual=manual), loader()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--method", default="imtl", help="any method of `lossbalance list`")
    parser.add_argument("--manual", action="store_true", help="manual optimization")
    args = parser.parse_args()
    module, data = build(args.method, args.manual)
    trainer = L.Trainer(
        max_steps=args.max_steps, accelerator="cpu", logger=False, enable_checkpointing=False
    )
    trainer.fit(module, data)
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}
    print(f"trained {trainer.global_step} steps; {metrics}")


if __name__ == "__main__":
    main()
