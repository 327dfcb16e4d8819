r"""The K x K Gramian of the per-term gradients without the K gradients.

For a parameter that enters the graph through one linear operation, the gradient of term i
is a product of the operation's input and the gradient of term i with respect to the
operation's output. For a linear layer ``y = x W^T + b`` with input ``X`` (n x a) and
per-term output gradients ``D_i`` (n x c), ``dL_i/dW = D_i^T X`` and

.. math::
    \langle D_i^T X,\ D_j^T X \rangle_F = \langle X X^T D_i,\ D_j \rangle_F

(the "ghost norm" identity of per-sample gradient clipping, here across terms instead of
samples). The right-hand side costs n^2 (a + K c) + K^2 n c instead of K n a c + K^2 a c:
much less than forming the K weight gradients whenever the batch is smaller than the
layer. The engine therefore

1. walks the autograd graph from the losses and recognises, for each shared parameter,
   the one operation that consumes it (``addmm``/``mm`` of a linear layer, possibly through
   a transpose, convolution, embedding, layer norm, batch norm in training);
2. runs K backward passes whose inputs are the outputs of those operations
   (``torch.autograd.graph.GradientEdge``): autograd then computes only the gradients with
   respect to activations, never the weight gradients (half a backward pass each);
3. per operation, adds its share of the Gramian in float64. A linear layer whose
   ``X X^T`` route costs fewer multiplications keeps its K output gradients until the
   passes end and goes through ``X X^T``; otherwise (and for convolutions, embeddings,
   norms, biases) each pass's output gradient is turned into that term's gradient of the
   layer at once (one ``convolution_backward`` weight gradient, one product, a segment
   sum) and dropped, so the layer holds K of its own gradients, not K activations.

Every other parameter (one used by two operations, a non-leaf, an operation not listed
above, batch norm in eval mode) is a *fallback*: its per-term gradients are inputs of the
same K passes, stacked for that parameter only. Nothing is double-differentiated, so
operations without double backward (``once_differentiable``, fused kernels) need no
special case.

The combined gradient ``sum_i beta_i g_i`` of the parameters whose K gradients were formed
(convolutions, norms, biases, the fallback) is a product with those stacks; one weighted
backward pass, which only has to reach the other layers, gives the rest.

Memory, beyond the graph: K output gradients of each ``X X^T`` layer (K times its output)
and K gradients of each layer on the other routes, the fallback's included; never K
gradients of the ``X X^T`` layers, which are the large ones when the batch is small.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from lossbalance._base import add_gramian

__all__ = ["autogram"]

# graph nodes that pass the gradient of a parameter on unchanged up to layout or rounding:
# the Gramian of the parameter equals the Gramian at the node's output
_TRANSPARENT = ("TBackward0", "ToCopyBackward0")


@dataclass
class _Site:
    """One recognised operation: its node, and the shared parameters it consumes."""

    node: Node
    slots: dict[int, Tensor] = field(default_factory=dict)


@dataclass
class Autogram:
    """What :func:`autogram` computed.

    Attributes:
        gramian: the ``(K, K)`` float64 Gramian.
        sums: one entry per ``extra`` leaf, ``None`` where no term reaches it.
        held: ``(parameter, (K, *p.shape) per-term gradients)`` for the shared parameters
            whose K gradients were formed anyway (convolutions, norms, biases, the
            fallback): their combined gradient needs no backward pass.
        fallbacks: how many shared parameters went through the fallback.
    """

    gramian: Tensor
    sums: list[Tensor | None]
    held: list[tuple[Tensor, Tensor]]
    fallbacks: int


def autogram(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    extra: Sequence[Tensor],
    extra_weights: Tensor | None,
) -> Autogram:
    """Gramian of the per-term gradients of ``shared`` and ``sum_i c_i dL_i/dp`` of ``extra``.

    Args:
        losses: K scalar tensors.
        shared: the parameters whose per-term gradients enter the Gramian.
        extra: leaves that get ``sum_i c_i`` of their per-term gradients (``c`` =
            ``extra_weights``, ones by default).
        extra_weights: ``c`` or ``None``.

    Returns:
        An :class:`Autogram`. The graph is kept (a weighted backward follows).
    """
    # the saved inputs and weights require grad: products of them outside no_grad would
    # record a graph that keeps every term's output gradient alive
    with torch.no_grad():
        return _autogram(losses, shared, extra, extra_weights)


def _autogram(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    extra: Sequence[Tensor],
    extra_weights: Tensor | None,
) -> Autogram:
    k = len(losses)
    device = losses[0].device
    acc = torch.device("cpu") if device.type == "mps" else device
    gram = torch.zeros(k, k, dtype=torch.float64, device=acc)
    sites, fallback = _find_sites(losses, shared)
    collectors = [_collector(site, k) for site in sites]
    edges = [GradientEdge(site.node, 0) for site in sites]
    inputs: list[Tensor | GradientEdge] = [*edges, *fallback, *extra]
    ne, nf = len(edges), len(fallback)
    stacks: list[Tensor | None] = [None] * nf
    sums: list[Tensor | None] = [None] * len(extra)
    coef = None if extra_weights is None else extra_weights.detach().cpu().tolist()
    for i, loss in enumerate(losses if inputs else ()):
        if not loss.requires_grad:
            continue
        grads = torch.autograd.grad(
            loss,
            inputs,  # type: ignore[arg-type]  # tensors and edges mixed are accepted
            retain_graph=True,
            allow_unused=True,
        )
        for j in range(ne):
            d = grads[j]
            if d is not None:
                collectors[j].add(i, d)
        for j in range(nf):
            g = grads[ne + j]
            if g is None:
                continue
            _check_dense(g, fallback[j], shared)
            buf = stacks[j]
            if buf is None:
                buf = stacks[j] = g.new_zeros((k, *g.shape))
            buf[i].copy_(g)
        for j in range(len(extra)):
            g = grads[ne + nf + j]
            if g is None:
                continue
            _check_dense(g, extra[j], extra, offset=len(shared))
            g = g if coef is None else g * coef[i]
            acc_j = sums[j]
            sums[j] = g.clone() if acc_j is None else acc_j.add_(g)
        del grads
    held: list[tuple[Tensor, Tensor]] = []
    for j in range(ne):
        collectors[j].finish(gram)
        held += collectors[j].held()
        collectors[j] = _Collector()  # frees this operation's other pieces before the next
    for p, buf in zip(fallback, stacks, strict=True):
        if buf is not None:
            add_gramian(gram, buf.reshape(k, -1))
            held.append((p, buf))
    return Autogram((gram + gram.T) / 2, sums, held, nf)


# --------------------------------------------------------------------------- graph walk


def _find_sites(
    losses: Sequence[Tensor], shared: Sequence[Tensor]
) -> tuple[list[_Site], list[Tensor]]:
    """The recognised operations and the parameters left to the fallback, in order."""
    consumers: dict[Node, list[Node]] = {}
    stack = [loss.grad_fn for loss in losses if loss.grad_fn is not None]
    seen: set[Node] = set(stack)
    leaves: dict[int, Node] = {}
    while stack:
        node = stack.pop()
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            leaves[id(variable)] = node
        for child, _ in node.next_functions:
            if child is None:
                continue
            consumers.setdefault(child, []).append(node)
            if child not in seen:
                seen.add(child)
                stack.append(child)
    # the position of each child in its consumer's next_functions (what the slot means)
    positions: dict[tuple[Node, Node], list[int]] = {}
    for node in seen:
        for pos, (child, _) in enumerate(node.next_functions):
            if child is not None:
                positions.setdefault((node, child), []).append(pos)
    counts: dict[int, int] = {}
    for p in shared:
        counts[id(p)] = counts.get(id(p), 0) + 1
    sites: dict[Node, _Site] = {}
    fallback: list[Tensor] = []
    for p in shared:
        found = None
        leaf = leaves.get(id(p))
        if leaf is not None and counts[id(p)] == 1 and p.is_floating_point():
            found = _consumer(leaf, consumers, positions)
        if found is None or not _supported(*found, p):
            fallback.append(p)
            continue
        node, slot = found
        sites.setdefault(node, _Site(node)).slots[slot] = p
    return list(sites.values()), fallback


def _consumer(
    leaf: Node,
    consumers: dict[Node, list[Node]],
    positions: dict[tuple[Node, Node], list[int]],
) -> tuple[Node, int] | None:
    """The single operation (and its input slot) that the parameter's gradient comes from."""
    node = leaf
    while True:
        users = consumers.get(node, [])
        if len(users) != 1:
            return None
        user = users[0]
        slots = positions.get((user, node), [])
        if len(slots) != 1:
            return None
        if user.name() not in _TRANSPARENT:
            return user, slots[0]
        node = user


def _supported(node: Node, slot: int, p: Tensor) -> bool:
    name = node.name()
    if name in ("AddmmBackward0", "MmBackward0"):
        return True
    if name == "ConvolutionBackward0":
        return slot in (1, 2) and not node._saved_transposed  # type: ignore[attr-defined]
    if name == "EmbeddingBackward0":
        return (
            slot == 0
            and not node._saved_sparse  # type: ignore[attr-defined]
            and not node._saved_scale_grad_by_freq  # type: ignore[attr-defined]
        )
    if name == "NativeLayerNormBackward0":
        return slot in (1, 2)
    if name == "NativeBatchNormBackward0":
        return slot in (1, 2) and node._saved_result1.numel() > 0  # type: ignore[attr-defined]
    return False


def _check_dense(g: Tensor, p: Tensor, params: Sequence[Tensor], offset: int = 0) -> None:
    if g.is_sparse:
        index = next(j for j, q in enumerate(params) if q is p) + offset
        raise TypeError(
            f"parameter {index} received a sparse gradient; per-term balancing needs dense "
            "gradients (use sparse=False in nn.Embedding)"
        )


# --------------------------------------------------------------------------- shares of G


class _Collector:
    """Receives the output gradient of one operation pass by pass (``add(i, d_i)``), keeps
    what its share of the Gramian needs, and adds that share (``finish(gram)``)."""

    def add(self, i: int, d: Tensor) -> None:
        pass

    def finish(self, gram: Tensor) -> None:
        pass

    def held(self) -> list[tuple[Tensor, Tensor]]:
        return []


class _Rows(_Collector):
    """Per-term gradients of small parameters, or of one layer's weight computed pass by
    pass: ``row(d_i)`` gives row i of a (K, N) stack. With ``param``, the row has the
    parameter's shape and the stack is kept for the combined gradient."""

    def __init__(
        self, k: int, row: Callable[[Tensor], Tensor], param: Tensor | None = None
    ) -> None:
        self.k = k
        self.row = row
        self.param = param
        self.buf: Tensor | None = None

    def held(self) -> list[tuple[Tensor, Tensor]]:
        if self.param is None or self.buf is None:
            return []
        return [(self.param, self.buf.view(self.k, *self.param.shape))]

    def add(self, i: int, d: Tensor) -> None:
        r = self.row(d).reshape(-1)
        if self.buf is None:
            self.buf = r.new_zeros((self.k, r.numel()))
        self.buf[i].copy_(r)

    def finish(self, gram: Tensor) -> None:
        if self.buf is not None:
            add_gramian(gram, self.buf)


class _Ghost(_Collector):
    r"""``G_ij += scale^2 <x^T d_i, x^T d_j>`` through ``x x^T`` from the K ``d_i`` (n, c)."""

    def __init__(self, k: int, x: Tensor, scale: float, transpose: bool) -> None:
        self.k, self.x, self.scale, self.transpose = k, x, scale, transpose
        self.buf: Tensor | None = None

    def add(self, i: int, d: Tensor) -> None:
        d = d.T if self.transpose else d
        if self.buf is None:
            self.buf = d.new_zeros((self.k, *d.shape))
        self.buf[i].copy_(d)

    def finish(self, gram: Tensor) -> None:
        if self.buf is None:
            return
        k = self.k
        kd = torch.matmul(self.x @ self.x.T, self.buf)  # (K, n, c)
        left = kd.reshape(k, -1).to(device=gram.device, dtype=torch.float64)
        right = self.buf.reshape(k, -1).to(device=gram.device, dtype=torch.float64)
        gram.addmm_(left, right.T, alpha=self.scale * self.scale)


class _Many(_Collector):
    def __init__(self, parts: list[_Collector]) -> None:
        self.parts = parts

    def held(self) -> list[tuple[Tensor, Tensor]]:
        return [pair for part in self.parts for pair in part.held()]

    def add(self, i: int, d: Tensor) -> None:
        for part in self.parts:
            part.add(i, d)

    def finish(self, gram: Tensor) -> None:
        for part in self.parts:
            part.finish(gram)


def _collector(site: _Site, k: int) -> _Collector:
    node = site.node
    name = node.name()
    if name in ("AddmmBackward0", "MmBackward0"):
        parts = _matmul(node, site.slots, k)
    elif name == "ConvolutionBackward0":
        parts = _conv(node, site.slots, k)
    elif name == "EmbeddingBackward0":
        parts = [_embedding(node, k)]
    else:
        parts = _norm(node, site.slots, k)
    return parts[0] if len(parts) == 1 else _Many(parts)


def _matmul(node: Node, slots: dict[int, Tensor], k: int) -> list[_Collector]:
    # out = beta * self + alpha * (mat1 @ mat2) for addmm, mat1 @ mat2 for mm
    addmm = node.name() == "AddmmBackward0"
    if addmm:
        mat1, mat2 = node._saved_mat1, node._saved_mat2  # type: ignore[attr-defined]
        alpha = float(node._saved_alpha)  # type: ignore[attr-defined]
        beta = float(node._saved_beta)  # type: ignore[attr-defined]
        first, second = 1, 2
    else:
        mat1, mat2 = node._saved_self, node._saved_mat2  # type: ignore[attr-defined]
        alpha = beta = 1.0
        first, second = 0, 1
    parts: list[_Collector] = []
    for slot, p in slots.items():
        if addmm and slot == 0:
            row = functools.partial(_bias_row, shape=p.shape, scale=beta)
            parts.append(_Rows(k, row, p))
        elif slot == second:
            # dL_i/dmat2 = alpha mat1^T D_i: a contraction over the rows of mat1
            parts.append(_Linear(k, mat1, alpha, transpose=False))
        elif slot == first:
            # dL_i/dmat1 = alpha D_i mat2^T, whose transpose is mat2 D_i^T
            parts.append(_Linear(k, mat2.T, alpha, transpose=True))
    return parts


class _Linear(_Collector):
    """The gradients ``scale x^T d_i`` of a matrix, for ``x`` (n, a) and ``d_i`` (n, c):
    through ``x x^T`` (:class:`_Ghost`) when that costs fewer multiplications than the K
    products, else row by row. Chosen on the first ``d_i`` (its width c is the output's)."""

    def __init__(self, k: int, x: Tensor, scale: float, transpose: bool) -> None:
        self.k, self.x, self.scale, self.transpose = k, x, scale, transpose
        self.inner: _Collector | None = None

    def add(self, i: int, d: Tensor) -> None:
        if self.inner is None:
            k, (n, a) = self.k, self.x.shape
            c = d.shape[0] if self.transpose else d.shape[1]
            direct = k * n * a * c + k * k * a * c
            ghost = n * n * a + k * n * n * c + k * k * n * c
            if ghost < direct:
                self.inner = _Ghost(k, self.x, self.scale, self.transpose)
            else:
                self.inner = _Rows(k, self._direct)
        self.inner.add(i, d)

    def _direct(self, d: Tensor) -> Tensor:
        g = self.x.T @ (d.T if self.transpose else d)
        return g if self.scale == 1.0 else g * self.scale

    def finish(self, gram: Tensor) -> None:
        if self.inner is not None:
            self.inner.finish(gram)
            self.inner = None


def _bias_row(d: Tensor, *, shape: torch.Size, scale: float) -> Tensor:
    out = _sum_to(d, shape)
    return out if scale == 1.0 else out * scale


def _sum_to(d: Tensor, shape: torch.Size) -> Tensor:
    """``d`` summed to ``shape`` the way autograd reduces a broadcast input."""
    lead = d.dim() - len(shape)
    out = d.sum(dim=tuple(range(lead))) if lead > 0 else d
    dims = [j for j, s in enumerate(shape) if s == 1 and out.shape[j] != 1]
    return out.sum(dim=dims, keepdim=True) if dims else out


def _conv(node: Node, slots: dict[int, Tensor], k: int) -> list[_Collector]:
    parts: list[_Collector] = []
    if 2 in slots:
        parts.append(_Rows(k, lambda d: d.sum(dim=(0, *range(2, d.dim()))), slots[2]))
    if 1 in slots:
        x = node._saved_input  # type: ignore[attr-defined]
        w = node._saved_weight  # type: ignore[attr-defined]
        args = (
            list(node._saved_stride),  # type: ignore[attr-defined]
            list(node._saved_padding),  # type: ignore[attr-defined]
            list(node._saved_dilation),  # type: ignore[attr-defined]
            False,
            list(node._saved_output_padding),  # type: ignore[attr-defined]
            int(node._saved_groups),  # type: ignore[attr-defined]
            [False, True, False],
        )

        # one weight gradient per term: folding the K terms into the output channels of
        # one call was 1.5x slower on the CPU (MNIST CNN, K = 10)
        def row(d: Tensor) -> Tensor:
            return torch.ops.aten.convolution_backward(d, x, w, None, *args)[1]

        parts.append(_Rows(k, row, slots[1]))
    return parts


def _embedding(node: Node, k: int) -> _Collector:
    idx = node._saved_indices.reshape(-1)  # type: ignore[attr-defined]
    uniq, inverse = torch.unique(idx, return_inverse=True)
    pad = int(node._saved_padding_idx)  # type: ignore[attr-defined]
    keep = None if pad < 0 else (uniq != pad)

    def row(d: Tensor) -> Tensor:
        rows = d.reshape(idx.numel(), -1)
        summed = rows.new_zeros((uniq.numel(), rows.shape[1])).index_add_(0, inverse, rows)
        return summed if keep is None else summed * keep[:, None]

    return _Rows(k, row)


def _norm(node: Node, slots: dict[int, Tensor], k: int) -> list[_Collector]:
    x = node._saved_input  # type: ignore[attr-defined]
    mean = node._saved_result1  # type: ignore[attr-defined]
    rstd = node._saved_result2  # type: ignore[attr-defined]
    if node.name() == "NativeLayerNormBackward0":
        lead = x.dim() - len(node._saved_normalized_shape)  # type: ignore[attr-defined]
        dims: tuple[int, ...] = tuple(range(lead))
        xhat = (x - mean) * rstd
    else:
        dims = (0, *range(2, x.dim()))
        view = (1, -1, *([1] * (x.dim() - 2)))
        xhat = (x - mean.reshape(view)) * rstd.reshape(view)
    parts: list[_Collector] = []
    if 1 in slots:
        parts.append(_Rows(k, lambda d: (d * xhat).sum(dim=dims), slots[1]))
    if 2 in slots:
        parts.append(_Rows(k, lambda d: d.sum(dim=dims), slots[2]))
    return parts
