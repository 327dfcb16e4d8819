"""PyTorch Lightning: ``lossbalance.lightning`` and the examples (skipped without lightning).

Every mode is checked against a plain loop that takes the same steps on the same batches.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lossbalance

L = pytest.importorskip("lightning")

pytestmark = pytest.mark.lightning

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fit(module, data, max_steps: int = 3, **kwargs) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    with warnings.catch_warnings():
        # Lightning's advice on data loader workers and logging is not under test
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    return trainer


def test_lightning_mtadam_example_trains():
    example = load("lightning_mtadam")
    module, data = example.build()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = fit(module, data)
    assert trainer.global_step == 3
    opt = module.optimizers().optimizer
    assert isinstance(opt, lossbalance.MTAdam)
    for p, b in zip(module.parameters(), before, strict=True):
        assert int(opt.state[p]["step"]) == 3
        assert not torch.equal(p, b) and torch.isfinite(p).all()
    assert opt.skipped_steps == 0


@pytest.mark.parametrize(
    ("method", "manual"),
    [("imtl", False), ("gradnorm", False), ("uncertainty", False), ("imtl", True)],
)
def test_lightning_balancer_example_trains(method, manual):
    example = load("lightning_balancer")
    module, data = example.build(method, manual)
    before = [p.detach().clone() for p in module.trunk.parameters()]
    trainer = fit(module, data)
    assert trainer.global_step == 3
    weights = module.balancer.last_weights
    assert weights is not None and weights.shape == (3,) and torch.isfinite(weights).all()
    for p, b in zip(module.trunk.parameters(), before, strict=True):
        assert not torch.equal(p, b) and torch.isfinite(p).all()
    state = trainer.optimizers[0].state
    assert all(int(state[p]["step"]) == 3 for p in module.trunk.parameters())


# --- lossbalance.lightning against plain loops ---

from lossbalance.lightning import MultiTermMixin, MultiTermModule, Terms  # noqa: E402

STEPS = 3


def data(batches: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16 * batches, 8, generator=gen)
    return DataLoader(TensorDataset(x, x[:, :2].sin()), batch_size=16)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(16, 1), nn.Linear(16, 1)])

    def losses(self, batch: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        x, y = batch
        z = self.trunk(x)
        return [
            (self.heads[0](z).squeeze(1) - y[:, 0]).pow(2).mean(),
            100.0 * (self.heads[1](z).squeeze(1) - y[:, 1]).abs().mean(),
        ], z


def mtadam(params) -> lossbalance.MTAdam:
    return lossbalance.MTAdam(params, lr=1e-2, grad_mode="sequential")


class MTAdamModule(MultiTermModule):
    def __init__(self, manual: str | None = None) -> None:
        super().__init__()
        self.net = Net()
        self.manual = manual
        self.automatic_optimization = manual is None

    def training_step(self, batch, batch_idx):
        losses, _ = self.net.losses(batch)
        if self.manual == "losses":
            self.optimizers().step(losses)
        elif self.manual == "closure":
            self.optimizers().step(closure=lambda: losses)
        else:
            return losses

    def configure_optimizers(self):
        return mtadam(self.parameters())


def mtadam_loop(micro: int = 1) -> Net:
    net = Net()
    opt = mtadam(net.parameters())
    for i, batch in enumerate(data(STEPS * micro)):
        losses, _ = net.losses(batch)
        opt.accumulate([loss / micro for loss in losses] if micro > 1 else losses)
        if (i + 1) % micro == 0:
            opt.step()
    return net


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("micro", [1, 2])
def test_automatic_optimization_with_mtadam_matches_a_plain_loop(micro):
    # training_step returning the terms was rejected by Lightning ("must return a Tensor,
    # a dict, or None")
    module = MTAdamModule()
    trainer = fit(module, data(STEPS * micro), max_steps=STEPS, accumulate_grad_batches=micro)
    assert trainer.global_step == STEPS
    assert_same(module.net, mtadam_loop(micro))
    opt = trainer.optimizers[0]
    assert all(int(opt.state[p]["step"]) == STEPS for p in module.parameters())


@pytest.mark.parametrize("manual", ["losses", "closure"])
def test_manual_optimization_with_mtadam_matches_a_plain_loop(manual):
    # self.optimizers().step(losses) failed in Lightning ("the closure should be callable")
    module = MTAdamModule(manual)
    trainer = fit(module, data(), max_steps=STEPS)
    assert trainer.global_step == STEPS
    assert_same(module.net, mtadam_loop())


class BalancedModule(MultiTermModule):
    def __init__(self, method: str, manual: bool = False) -> None:
        super().__init__()
        self.net = Net()
        torch.manual_seed(0)
        self.balancer = lossbalance.create(method, 2)
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        losses, z = self.net.losses(batch)
        if self.automatic_optimization:
            return Terms(losses, shared=self.net.trunk, features=z)
        opt = self.optimizers()
        opt.zero_grad()
        lossbalance.backward(losses, self.balancer, shared=self.net.trunk, features=z)
        opt.step()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def balanced_loop(method: str, micro: int = 1) -> tuple[Net, nn.Module]:
    net = Net()
    torch.manual_seed(0)
    balancer = lossbalance.create(method, 2)
    opt = torch.optim.Adam([*net.parameters(), *balancer.parameters()], lr=1e-2)
    for i, batch in enumerate(data(STEPS * micro)):
        if i % micro == 0:
            opt.zero_grad()
        losses, z = net.losses(batch)
        losses = [loss / micro for loss in losses] if micro > 1 else losses
        lossbalance.backward(losses, balancer, shared=net.trunk, features=z)
        if (i + 1) % micro == 0:
            opt.step()
    return net, balancer


@pytest.mark.parametrize(
    ("method", "manual", "micro"),
    [("imtl", False, 1), ("uncertainty", False, 1), ("imtl", False, 2), ("imtl", True, 1)],
)
def test_balancer_matches_a_plain_loop(method, manual, micro):
    module = BalancedModule(method, manual)
    trainer = fit(module, data(STEPS * micro), max_steps=STEPS, accumulate_grad_batches=micro)
    assert trainer.global_step == STEPS
    net, balancer = balanced_loop(method, micro)
    assert_same(module.net, net)
    assert_same(module.balancer, balancer)


def test_one_loss_with_mtadam_says_what_to_do():
    class OneLoss(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()

        def training_step(self, batch, batch_idx):
            return sum(self.net.losses(batch)[0])

        def configure_optimizers(self):
            return mtadam(self.parameters())

    with pytest.raises(TypeError, match=r"closure returned one loss.*MultiTermModule"):
        fit(OneLoss(), data())


def test_terms_without_a_balancer_say_what_to_do():
    class NoBalancer(MTAdamModule):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters())

    with pytest.raises(TypeError, match=r"self.balancer = lossbalance.create"):
        fit(NoBalancer(), data())


def test_backward_options_with_mtadam_are_rejected():
    class WithOptions(MTAdamModule):
        def training_step(self, batch, batch_idx):
            losses, z = self.net.losses(batch)
            return Terms(losses, features=z)

    with pytest.raises(TypeError, match=r"options \['features'\].*with MTAdam"):
        fit(WithOptions(), data())


def test_training_step_output_is_checked():
    class Text(MTAdamModule):
        def training_step(self, batch, batch_idx):
            return "loss"

    with pytest.raises(TypeError, match=r"training_step returned a str: expected the loss terms"):
        fit(Text(), data())

    class Skip(MTAdamModule):
        def training_step(self, batch, batch_idx):
            return None

    with pytest.raises(TypeError, match=r"MTAdam.step needs the loss terms"):
        fit(Skip(), data())


def test_mixin_listed_after_lightning_module_is_rejected():
    with pytest.raises(TypeError, match="list MultiTermMixin before LightningModule"):

        class Wrong(L.LightningModule, MultiTermMixin):  # type: ignore[misc]
            pass


def test_lightning_dict_and_tensor_outputs_keep_their_meaning():
    class Plain(MultiTermModule):
        def __init__(self, as_dict: bool) -> None:
            super().__init__()
            self.net = Net()
            self.as_dict = as_dict

        def training_step(self, batch, batch_idx):
            loss = sum(self.net.losses(batch)[0])
            return {"loss": loss} if self.as_dict else loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    for batch in list(data())[:STEPS]:
        opt.zero_grad()
        sum(net.losses(batch)[0]).backward()
        opt.step()
    for as_dict in (False, True):
        module = Plain(as_dict)
        fit(module, data(), max_steps=STEPS)
        assert_same(module.net, net)


def test_mtadam_step_closure_protocol():
    net = Net()
    opt = mtadam(net.parameters())
    batch = next(iter(data()))
    with pytest.raises(TypeError, match="either losses or a closure that returns them"):
        opt.step(net.losses(batch)[0], closure=lambda: net.losses(batch)[0])
    with pytest.raises(TypeError, match="closure returned one loss"):
        opt.step(closure=lambda: sum(net.losses(batch)[0]))
    with pytest.raises(TypeError, match="needs the loss terms"):
        opt.step(closure=lambda: None)
    assert not opt.state  # nothing was applied

    def accumulating() -> Tensor:
        losses, _ = net.losses(batch)
        opt.accumulate(losses)
        return sum(loss.detach() for loss in losses)

    twin = Net()
    twin_opt = mtadam(twin.parameters())
    opt.step(closure=accumulating)
    twin_opt.step(twin.losses(batch)[0])
    opt.step(net.losses(batch)[0], closure=lambda: None)
    twin_opt.step(twin.losses(batch)[0])
    assert_same(net, twin)


def fp16_plugin() -> L.pytorch.plugins.MixedPrecision:
    # Lightning's "16-mixed" has a GradScaler on GPUs only; the same plugin, on the CPU
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    return L.pytorch.plugins.MixedPrecision("16-mixed", "cpu", scaler=scaler)


def test_balancer_under_16_mixed_matches_a_plain_loop():
    module = BalancedModule("imtl")
    plugin = fp16_plugin()
    fit(module, data(), max_steps=STEPS, plugins=[plugin])
    net = Net()
    torch.manual_seed(0)
    balancer = lossbalance.create("imtl", 2)
    opt = torch.optim.Adam([*net.parameters(), *balancer.parameters()], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for batch in list(data())[:STEPS]:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            losses, z = net.losses(batch)
        lossbalance.backward(losses, balancer, shared=net.trunk, features=z, grad_scaler=scaler)
        scaler.step(opt)
        scaler.update()
    assert plugin.scaler is not None and plugin.scaler.get_scale() == scaler.get_scale()
    assert_same(module.net, net)
    assert_same(module.balancer, balancer)


def test_mtadam_under_16_mixed_says_what_to_do():
    with pytest.raises(RuntimeError, match=r"16-mixed.*bf16-mixed.*grad_scaler=scaler"):
        fit(MTAdamModule(), data(), plugins=[fp16_plugin()])


def test_lightning_gradient_clipping_with_mtadam_says_what_to_do():
    with pytest.raises(RuntimeError, match=r"gradient_clip_val=1.0.*max_grad_norm"):
        fit(MTAdamModule(), data(), gradient_clip_val=1.0)


def test_lightning_checkpoint_resumes_mtadam_bit_identically(tmp_path):
    # two batches an epoch: the checkpoint is taken at an epoch's end, so that the resumed
    # run sees the batches the uninterrupted one sees
    straight = MTAdamModule()
    fit(straight, data(2), max_steps=3)
    first = MTAdamModule()
    trainer = fit(first, data(2), max_steps=2)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed = MTAdamModule()
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(resumed, data(2), ckpt_path=tmp_path / "two.ckpt")
    assert trainer.global_step == 3
    assert_same(resumed.net, straight.net)


def test_lossbalance_lightning_imports_without_lightning():
    code = (
        "import sys; sys.modules['lightning'] = sys.modules['lightning.pytorch'] = None\n"
        "import lossbalance, lossbalance.lightning as m\n"
        "assert 'lightning' not in [k for k, v in sys.modules.items() if v is not None]\n"
        "try:\n    m.MultiTermModule\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "needs PyTorch Lightning: pip install lightning" in out.stdout
