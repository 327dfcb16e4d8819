"""The per-term gradient engine behind ``lossbalance.backward`` (nothing here is public API).

Layers, each importing only those below it:

- ``_graph``: per-term gradients by K ``autograd.grad`` passes or one batched pass, and the
  autograd-graph walk that finds the leaves a loss reaches.
- ``_vjp``: the alternative vectorised paths (two-stage, ``torch.func``) and the timed choice
  among them.
- ``_autogram``: the Gramian built layer by layer without the per-term gradients.
- ``_engine``: ``term_grads`` and ``term_gramian`` (the modes), the exact / gramian / feature
  steps of a balanced backward.
- ``_distributed``, ``_fsdp``: DDP and FSDP2 support (averaging, sharded layouts).
- ``_backward``: ``lossbalance.backward`` itself; ``_accumulator``: gradient accumulation.
"""
