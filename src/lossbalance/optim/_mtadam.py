"""MTAdam: Adam that balances the terms of a multi-term loss (Malkiel & Wolf 2020)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lossbalance._registry import MethodInfo, register
from lossbalance._validation import (
    as_loss_list,
    check_beta,
    check_choice,
    check_nonneg,
    check_positive,
    warn_once,
)
from lossbalance.engine import _vjp
from lossbalance.engine._distributed import (
    all_reduce_mean_and_sum,
    check_layout,
    layout_of,
    resolve_group,
)
from lossbalance.engine._engine import GRAD_MODES, auto_key, term_grads
from lossbalance.engine._fsdp import is_sharded, local, per_term_backward, shard_like, sharded_zeros
from lossbalance.optim._fused import fused_available, fused_update

__all__ = ["MTAdam", "mtadam"]

GROUPINGS = ("parameter", "module", "global")
NORMALIZATIONS = ("anchor", "unit", "none")
SECOND_MOMENTS = ("max", "own", "mean")
MAGNITUDE_INITS = ("first", "one")

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _state_dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


def _real(t: Tensor) -> Tensor:
    """A complex tensor as a view of real (``(*shape, 2)``), as torch.optim.Adam updates it."""
    return torch.view_as_real(t) if t.is_complex() else t


STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "magnitude")
OPTIONS = ("grouping", "normalization", "second_moment", "magnitude_init")


class MTAdam(Optimizer):
    r"""Adam that balances the terms of a multi-term loss per layer (MTAdam).

    Malkiel & Wolf, "MTAdam: Automatic Balancing of Multiple Training Loss Terms",
    arXiv 2006.14683 (2020), Algorithm 1. At step :math:`t`, for terms
    :math:`i = 1..I` (term 1, ``losses[0]``, is the anchor) and each layer :math:`l`:

    .. math::
        g_{i,l} &= \nabla_{\theta_l} L_i \\
        n_{i,l} &\leftarrow \beta_3 n_{i,l} + (1 - \beta_3) \lVert g_{i,l} \rVert \\
        \tilde g_{i,l} &= w_i \, g_{i,l} \, n_{a,l} / n_{i,l} \\
        m_i &\leftarrow \beta_1 m_i + (1 - \beta_1) \tilde g_i, \qquad
        v_i \leftarrow \beta_2 v_i + (1 - \beta_2) \tilde g_i^2 \\
        \theta &\leftarrow \theta - \mathrm{lr} \, \frac{\sum_i m_i / (1 - \beta_1^t)}
            {\sqrt{\max_i v_i / (1 - \beta_2^t)} + \epsilon}

    with ``betas = (beta1, beta2, beta3)``, :math:`w_i` = ``term_weights[i]`` (default 1)
    and :math:`a` the anchor: the first term whose magnitude in the layer is *measured*,
    :math:`n_{i,l} > \tau_l`; a term at or below :math:`\tau_l` passes unscaled and is not
    the anchor. The threshold is relative and dtype-aware,
    :math:`\tau_l = \mathrm{tiny} \cdot \max(1, \max_j n_{j,l})` with tiny the smallest
    normal number of the state dtype (``torch.finfo(dtype).tiny``: 1.2e-38 for float32,
    2.2e-308 for float64): a term whose gradient is exactly zero in a layer passes unscaled,
    while any ratio the dtype can represent is balanced, so scaling a non-anchor term by
    1e-15 .. 1e15 (float64; float32 as far as its range allows) changes nothing but
    rounding, and :math:`n_a / n_i < 1 / \mathrm{tiny}` stays finite. (The authors' code,
    and this class before, used an absolute ``1e-10``, which ignored a term scaled by
    1e-15; the functional :func:`~lossbalance.functional.mtadam` still takes an absolute
    ``threshold=``.) The magnitude EMA starts from the first measured magnitude
    (``magnitude_init="first"``, as the authors' code) or from Algorithm 1's literal
    :math:`n_0 = 1` (``magnitude_init="one"``). A layer is a parameter tensor. Norms are
    computed without overflow: float32 sums of squares overflow above a norm of ~1.8e19, so
    on CUDA they accumulate in float64 and elsewhere such a norm is measured again on the
    gradients scaled by :math:`2^{-100}`.

    Because all terms share one bias correction, :math:`\sum_i m_i` is kept in a single
    buffer; only the second moments have one slice per term, so the state is
    :math:`(I + 1)|\theta|` elements plus :math:`I` magnitudes per parameter tensor.
    Dtypes: bf16/fp16 parameters get float32 state; the update is computed in float32 and
    rounded into the parameter (no float32 master copy is kept, as in torch.optim.Adam).
    :meth:`load_state_dict` keeps that float32 state (it never rounds it to the
    parameter's dtype), so a resumed run continues bit-identically for float16, bfloat16,
    float32 and float64. Complex parameters are updated as views of real
    (``torch.view_as_real``), as torch.optim.Adam does: complex moments, real magnitudes,
    the magnitude of a complex gradient its 2-norm; with one term MTAdam equals
    torch.optim.Adam on them. Per-term gradients may have any strides or memory format
    (channels_last, transposed views); the parameter keeps its own memory format.

    Memory: on the CPU, the per-term gradient stacks of the sequential grad mode
    (:math:`I|\theta|` elements, as much as the second moments) are kept between steps and
    written again, which saves a fresh allocation and its page faults each step; they are
    not state (not in ``state_dict``). ``keep_stacks=False`` frees them after every step
    (for a model whose :math:`I|\theta|` does not fit twice), :meth:`release_buffers` frees
    them once (e.g. before evaluation); the next step allocates them again.

    FSDP2 (``fully_shard``): sharded parameters get their per-term gradients from one
    ``backward()`` per term, which FSDP reduce-scatters (their sharded ``.grad`` is used and
    restored); their moments are ``DTensor``\ s sharded like them, so each rank holds
    :math:`(I + 1)|\theta| / R` elements plus the magnitudes; a layer's magnitude is the
    norm of the whole layer, from the shards' squared norms summed in the step's one
    all-reduce. Parameters left out of ``fully_shard`` are averaged as under DDP. Save with
    ``torch.distributed.checkpoint`` (or ``get_optimizer_state_dict``); to load into a fresh
    optimizer, call :meth:`init_state` first. ``max_grad_norm`` is refused there.

    Gradient accumulation: :meth:`accumulate` adds a micro-batch's per-term gradients, the
    next :meth:`step` applies the sums. :meth:`zero_grad` and :meth:`load_state_dict` drop
    pending micro-batches; :meth:`step_with_grads` raises while there are any.

    Clipping: ``.grad`` plays no part in :meth:`step` (it computes the per-term gradients
    itself; a warning says so when ``.grad`` is set on its parameters), so
    ``clip_grad_norm_`` before it does nothing. ``max_grad_norm=c`` clips instead the
    global norm of the balanced gradient :math:`\sum_i \tilde g_i` (scaled and weighted,
    before weight decay) over all parameters of the step, by the factor
    :math:`\min(1, c / (\lVert \sum_i \tilde g_i \rVert + 10^{-6}))` applied to every
    :math:`\tilde g_i` before both moments. That is what ``clip_grad_norm_(c)`` does to
    ``torch.optim.Adam``'s input, so with one term the two agree (up to rounding). The
    balanced gradient is clipped rather than each raw :math:`g_i` because balancing would
    undo a per-term clip (the scales :math:`n_{a,l}/n_{i,l}` restore the anchor's
    magnitude), and the clip should bound the step's input, as for Adam. The magnitudes
    are measured before clipping. The clip costs one more pass over the stacks.

    Args:
        params: parameters or param groups (named parameters are accepted, and are needed
            for ``grouping="module"``).
        lr: learning rate, ``lr >= 0`` (default ``1e-3``).
        betas: ``(beta1, beta2, beta3)``, each in ``[0, 1)`` (default ``(0.9, 0.999, 0.9)``);
            ``beta3`` is the decay of the magnitude EMA.
        eps: added to the denominator, ``eps >= 0`` (default ``1e-8``).
        weight_decay: ``>= 0`` (default ``0``). L2 penalty ``weight_decay * theta`` added
            once per step to the anchor's balanced gradient (after the magnitudes are
            measured), so with one term MTAdam equals ``torch.optim.Adam``.
        decoupled_weight_decay: apply AdamW-style decay ``theta *= 1 - lr * weight_decay``
            instead (default ``False``).
        term_weights: per-term multipliers :math:`w_i` applied after balancing (the
            authors' ``ranks``); ``None`` means all ones. Its length must match the number
            of terms.
        grouping: what a layer is: ``"parameter"`` (each tensor, the paper's setting),
            ``"module"`` (tensors of one module share a magnitude; needs named
            parameters; a module is a (param group, module path) pair, so two groups whose
            layers are both named ``0``, e.g. an encoder and a decoder ``Sequential``, or a
            head added with :meth:`add_param_group`, are two modules, and a name that
            appears twice within one group is refused), ``"global"`` (one magnitude per
            term for the whole model, Table 5 ablation (ii)).
        normalization: ``"anchor"`` (the method), ``"unit"`` (each term divided by its own
            magnitude without the anchor's, ablation (iii)) or ``"none"`` (no magnitude
            normalisation, ablation (i)).
        second_moment: ``"max"`` (the method), ``"own"`` (each term divided by its own
            second moment, ablation (iv); keeps one first moment per term) or ``"mean"``
            (mean of the second moments, ablation (v); keeps a single buffer).
        magnitude_init: ``"first"`` or ``"one"``, see above.
        grad_mode: how :meth:`step` computes per-term gradients (``"auto"``,
            ``"sequential"``, ``"batched"``, ``"two_stage"``); see
            :func:`lossbalance.term_grads` (``"auto"`` times the modes at the first step).
        process_group: under ``torch.distributed``, the per-term gradients and loss values
            are averaged across this group's ranks in one all-reduce per step before
            anything else, so every rank applies the identical update (the result equals
            single-process training on the concatenated batch). ``"auto"`` (default) uses
            the default group when one is initialised with more than one rank; ``None``
            disables averaging.
        sync_free: never read a tensor value on the host inside :meth:`step`: a non-finite
            step is applied with zero weights instead of being branched on. ``None``
            (default) means on accelerators; on the CPU reading the flag costs nothing, so
            a bad step returns early there.
        fused: run the element-wise update as one ``torch.compile`` region per (device,
            dtype) (:mod:`lossbalance.optim._fused`: a few Triton kernels on CUDA instead of
            about a hundred launches). ``False`` (default): the multi-tensor path;
            ``True``: compiled wherever torch.compile works (Triton on CUDA, inductor's
            C++ on the CPU, where the multi-tensor path is as fast); ``None``: on CUDA
            where Triton is available. Opt-in until it has been measured on a GPU
            (it is tested on the CPU only). The first step compiles (seconds); a bucket
            that fails to compile warns once and takes the multi-tensor path. Equal to
            it up to float rounding.
        max_grad_norm: clip the global norm of the balanced gradient to this value
            (``> 0``; default ``None``, no clipping), see "Clipping" above. A param-group
            option (saved in ``state_dict``'s ``param_groups``); groups with different
            values share the one global norm, each clipped to its own limit.
        keep_stacks: keep the CPU per-term gradient stacks between steps (default
            ``True``), see "Memory" above.

    CUDA graphs: with ``sync_free`` (the default on CUDA) a whole training step (forward,
    ``step(losses)``) can be captured with ``torch.cuda.graph`` and replayed. The step
    counter and the bias corrections are device tensors, so replays advance them. Run at
    least one eager step first (on a side stream, as the ``torch.cuda.graph`` docs do for
    ``torch.optim.Adam``), so that the state is allocated outside the graph and
    ``grad_mode="auto"`` has made its choice; capturing before raises. ``lr``, betas, eps,
    weight decay and ``term_weights`` are baked into the graph (capture again after
    changing them, e.g. with a scheduler). Inside replays a skipped step is counted in
    :attr:`skipped_steps` but not warned about.

    Example:
        >>> import torch, lossbalance
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = lossbalance.MTAdam(model.parameters(), lr=1e-2)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> out = model(x)
        >>> losses = [(out - y).pow(2).mean(), 1000 * out.abs().mean()]
        >>> opt.step(losses)  # computes the per-term gradients itself
        >>> opt.state[model.weight]["exp_avg_sq"].shape  # one second moment per term
        torch.Size([2, 1, 3])

    Differences from the authors' code:
        - Every parameter is updated; their loop ``break``s out of the whole group at the
          first parameter without a gradient, so later parameters are skipped and their
          per-step lists grow every step. A term that does not reach a parameter
          contributes a zero gradient there; a parameter no term reaches is left alone.
        - The magnitude EMAs live in ``self.state`` (their code kept them as attributes of
          the parameter tensors, outside ``state_dict``, so a resumed run crashed).
        - Weight decay is applied once per step, not once per term.
        - Runs on any device and dtype, without CUDA or TensorFlow, and without host
          synchronisation inside :meth:`step`.
        - Their anchor search reads, for terms after the current one, the previous
          step's magnitudes; here all magnitudes of the step are updated first.
        - ``term_weights`` multiply every term; theirs skipped the multiplier of a term
          whose magnitude was below the threshold.
        - A step whose losses or gradients are not finite is skipped (parameters and state
          untouched), counted in :attr:`skipped_steps` and warned about once. Under a
          ``grad_scaler``, a step whose losses are finite but whose scaled gradients
          overflowed is the scaler's normal back-off: it is counted in
          :attr:`scaler_skipped_steps`, without a warning. Both counters are saved in
          ``state_dict``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decoupled_weight_decay: bool = False,
        term_weights: Sequence[float] | None = None,
        grouping: str = "parameter",
        normalization: str = "anchor",
        second_moment: str = "max",
        magnitude_init: str = "first",
        grad_mode: str = "auto",
        process_group: Any = "auto",
        sync_free: bool | None = None,
        fused: bool | None = False,
        max_grad_norm: float | None = None,
        keep_stacks: bool = True,
    ) -> None:
        if isinstance(lr, Tensor):
            raise TypeError("MTAdam takes lr as a float")
        check_nonneg("learning rate", lr)
        check_nonneg("eps", eps)
        check_nonneg("weight_decay", weight_decay)
        if not isinstance(betas, (tuple, list)) or len(betas) != 3:
            raise ValueError(f"Invalid betas: {betas!r} (expected (beta1, beta2, beta3))")
        for name, b in zip(("beta1", "beta2", "beta3"), betas):
            check_beta(name, b)
        check_choice("grouping", grouping, GROUPINGS)
        check_choice("normalization", normalization, NORMALIZATIONS)
        check_choice("second_moment", second_moment, SECOND_MOMENTS)
        check_choice("magnitude_init", magnitude_init, MAGNITUDE_INITS)
        check_choice("grad_mode", grad_mode, GRAD_MODES)
        _check_max_grad_norm(max_grad_norm)
        if not isinstance(keep_stacks, bool):
            raise TypeError(f"Invalid keep_stacks: {keep_stacks!r} (expected a bool)")
        if term_weights is not None:
            term_weights = [float(w) for w in term_weights]
            for w in term_weights:
                if not (w >= 0.0 and w < float("inf")):
                    raise ValueError(f"Invalid term weight: {w} (expected 0 <= weight < inf)")
        self.term_weights = term_weights
        self.grouping = grouping
        self.normalization = normalization
        self.second_moment = second_moment
        self.magnitude_init = magnitude_init
        self.grad_mode = grad_mode
        self._resolved_grad_mode: str | None = None
        self.process_group = process_group
        if fused not in (None, True, False):
            raise TypeError(f"Invalid fused: {fused!r} (expected None, True or False)")
        self.sync_free = sync_free
        self.fused = fused
        self.keep_stacks = keep_stacks
        # None: the relative, dtype-aware pass-through rule of the class docstring
        self.threshold: float | None = None
        self._accum: dict[Tensor, Tensor] = {}
        self._accum_losses: Tensor | None = None
        self._accum_scaled = False
        self.num_terms: int | None = None
        self._skipped: Tensor | None = None
        self._skipped_host = 0
        self._scaler_skipped: Tensor | None = None
        self._scaler_skipped_host = 0
        self._pending: list[tuple[Any, Tensor]] = []
        self._cache: dict[Any, Tensor] = {}
        # the CPU's per-term gradient stacks, reused from step to step (see _accumulate)
        self._stacks: dict[Tensor, Tensor] = {}
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            max_grad_norm=max_grad_norm,
        )
        super().__init__(params, defaults)
        if fused:
            for device in {p.device for g in self.param_groups for p in g["params"]}:
                if not fused_available(device):
                    raise RuntimeError(
                        f"MTAdam(fused=True) cannot compile for {device} (torch.compile "
                        "unsupported here, or no Triton for CUDA): use fused=None"
                    )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Accept (name, tensor) pairs on every torch version: names drive grouping="module".
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        params = list(params)
        param_group = dict(param_group)
        param_group["params"] = params
        if params and all(isinstance(p, tuple) for p in params):
            param_group["param_names"] = [name for name, _ in params]
            param_group["params"] = [p for _, p in params]
        _check_max_grad_norm(param_group.get("max_grad_norm"))
        if self.grouping == "module":
            # A layer is (param group, module path): two groups may both name a layer "0"
            # (encoder and decoder Sequentials), but within a group a name must be unique.
            names = param_group.get("param_names")
            if names is None:
                raise ValueError(
                    "grouping='module' needs named parameters: pass "
                    "model.named_parameters() (or groups of named parameters)"
                )
            # named_parameters() lists a module's own tensors together and never repeats a
            # name: a repeated name, or a module path that comes back after another one,
            # means that the group joins several modules' names, which can collide
            seen: set[str] = set()
            done: set[str] = set()
            last = None
            for name in names:
                module = name.rpartition(".")[0]
                if name in seen or (module in done and module != last):
                    what = (
                        f"{name!r} names two parameters"
                        if name in seen
                        else (f"the parameters of module {module!r} are not listed together")
                    )
                    raise ValueError(
                        f"grouping='module': {what} in one param group, so its modules cannot "
                        "be told apart by name: pass each module's named_parameters() as its "
                        "own param group, or give them distinct prefixes "
                        "(named_parameters(prefix=...))"
                    )
                seen.add(name)
                if last is not None and module != last:
                    done.add(last)
                last = module
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ public API

    def init_state(self, num_terms: int) -> None:
        """Allocate the state of every parameter for ``num_terms`` terms, as a first step
        would before its update (zero moments and magnitudes, step 0): nothing else
        changes, and the next step runs as on a fresh optimizer.

        For loading a checkpoint in place: ``torch.distributed.checkpoint.load`` fills the
        tensors that ``state_dict()`` lists, and ``set_optimizer_state_dict`` would else
        initialise the state with a ``step()`` without losses, which MTAdam cannot take.
        Call it on the fresh optimizer before either; parameters that are sharded
        (``fully_shard``) get sharded state.
        """
        if not isinstance(num_terms, int) or num_terms < 1:
            raise ValueError(f"Invalid num_terms: {num_terms!r} (expected an int >= 1)")
        self._check_num_terms(num_terms)
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._init_state(p, num_terms)

    @property
    def skipped_steps(self) -> int:
        """Number of steps skipped because a loss or gradient was not finite (warned about);
        steps a ``GradScaler`` overflow skipped are in :attr:`scaler_skipped_steps`."""
        self._flush_pending()
        if self._skipped is None:
            return self._skipped_host
        return self._skipped_host + int(self._skipped.item())

    @property
    def scaler_skipped_steps(self) -> int:
        """Number of steps skipped, without a warning, because the gradients scaled by the
        ``grad_scaler`` overflowed while the losses were finite (the scaler's normal
        back-off, e.g. at the first steps)."""
        if self._scaler_skipped is None:
            return self._scaler_skipped_host
        return self._scaler_skipped_host + int(self._scaler_skipped.item())

    def release_buffers(self) -> None:
        """Free the per-term gradient stacks kept between CPU steps (:math:`I|\\theta|`
        elements, not state; see ``keep_stacks``). The next step allocates them again."""
        self._stacks = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset ``.grad`` as ``torch.optim.Optimizer.zero_grad`` does, and drop the
        micro-batches accumulated with :meth:`accumulate` that no step has applied yet."""
        self._drop_accumulated()
        super().zero_grad(set_to_none)

    def magnitudes(self) -> dict[Tensor, Tensor]:
        """The magnitude EMAs ``n_{i,l}``: for each stepped parameter a ``(I,)`` tensor."""
        return {p: s["magnitude"] for p, s in self.state.items() if "magnitude" in s}

    # the per-term backward passes go through autograd: traced by dynamo, they fail on
    # the second call, so a compiled caller graph-breaks here and the step runs eagerly
    @torch.compiler.disable
    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        losses: Sequence[Tensor] | Mapping[Any, Tensor] | None = None,
        closure: Callable[[], Any] | None = None,
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> Any:
        """Compute the per-term gradients of ``losses`` and apply one MTAdam update.

        Args:
            losses: list, tuple or ordered mapping of scalar loss tensors; the first is the
                anchor. Do not call ``backward()`` on them first. If gradients were
                accumulated with :meth:`accumulate`, these are added to them; with no
                losses, the accumulated gradients alone are applied.
            closure: alternatively, a callable that recomputes the model and returns the
                losses (as for ``torch.optim.LBFGS``), or one loss after passing the terms
                to :meth:`accumulate` itself (``lossbalance.lightning.MultiTermModule``).
                Together with ``losses``, it must return ``None`` (Lightning's manual step).
            grad_scaler: a ``torch.amp.GradScaler``: the losses are scaled by it, the
                per-term gradients unscaled before magnitudes and moments are computed,
                and a step with inf/NaN gradients is skipped and reported to the scaler,
                so that ``grad_scaler.update()`` lowers the scale as usual.

        Returns:
            What ``closure`` returned, else ``None``.
        """
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
            if losses is not None and result is not None:
                raise TypeError(
                    "MTAdam.step takes either losses or a closure that returns them, not both"
                )
            if isinstance(result, Tensor) and result.dim() == 0:
                # one loss is fine only if the closure accumulated the terms itself
                if not self._accum:
                    raise TypeError(
                        "MTAdam.step(closure=...): the closure returned one loss, MTAdam needs "
                        "the loss terms: return them from the closure ([loss_0, loss_1, ...]); "
                        "under PyTorch Lightning, subclass lossbalance.lightning.MultiTermModule "
                        "and return the terms from training_step"
                    )
            elif result is not None:
                losses = result
        if losses is None and not self._accum:
            raise TypeError(
                "MTAdam.step needs the loss terms: call opt.step([loss_0, loss_1, ...]) "
                "(or opt.step_with_grads(...) with per-term gradients)"
            )
        if losses is not None:
            self._accumulate(losses, grad_scaler)
        stacked, loss_vec, scaled = self._accum, self._accum_losses, self._accum_scaled
        self._drop_accumulated()
        finite = self._apply(stacked, loss_vec, scaled=scaled)
        if grad_scaler is not None and grad_scaler.is_enabled() and finite is not None:
            _report_to_scaler(grad_scaler, self, finite)
        return result

    @torch.compiler.disable
    @torch.no_grad()
    def accumulate(
        self,
        losses: Sequence[Tensor] | Mapping[Any, Tensor],
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        """Add the per-term gradients of one micro-batch; the next :meth:`step` applies them.

        For gradient accumulation: call ``accumulate(losses)`` on each micro-batch (with
        losses divided by the number of micro-batches for mean-reduced losses) and
        ``step()`` once. Magnitudes and moments see only the summed gradients.

        Pending micro-batches are applied by the next :meth:`step` only: :meth:`zero_grad`
        and :meth:`load_state_dict` drop them, and :meth:`step_with_grads` refuses to run
        while there are any (it cannot apply them).
        """
        self._accumulate(losses, grad_scaler)

    def _drop_accumulated(self) -> None:
        self._accum, self._accum_losses, self._accum_scaled = {}, None, False

    def _accumulate(self, losses: Any, grad_scaler: torch.amp.GradScaler | None) -> None:
        with torch.enable_grad():
            # reshape of a (1,)-shaped loss must stay in the graph
            items = as_loss_list(losses)
        self._check_num_terms(len(items))
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        if not params:
            return
        if any(p.grad is not None for p in params):
            warn_once(
                "mtadam-dot-grad",
                "MTAdam.step(losses) computes the per-term gradients itself and ignores the "
                ".grad set on its parameters (a backward() or clip_grad_norm_ before it has no "
                "effect): clip with MTAdam(max_grad_norm=...), or pass gradients you computed "
                "with step_with_grads(...)",
                stacklevel=5,
            )
        scaling = grad_scaler is not None and grad_scaler.is_enabled()
        # the loss values as the user computed them: a scaled loss can overflow where the
        # loss is finite, and that overflow is the scaler's business, not a bad loss
        loss_vec = torch.stack([loss.detach().float() for loss in items])
        if scaling:
            assert grad_scaler is not None
            with torch.enable_grad():
                items = [grad_scaler.scale(loss) for loss in items]
        mode = self.grad_mode
        if mode == "auto" and self._resolved_grad_mode is not None:
            mode = self._resolved_grad_mode
        # On the CPU the sequential stacks of the last step are written again: a fresh
        # (I, |p|) block is a fresh mapping from the kernel each step (page faults, zeroing),
        # which costs a few % of the step. Not while accumulating (the first micro-batch's
        # stacks are then the accumulators), and not on accelerators (caching allocators).
        reuse = self.keep_stacks and not self._accum and all(p.device.type == "cpu" for p in params)
        sharded = any(is_sharded(p) for p in params)
        if sharded:
            # FSDP2: the sharded parameters are not in the autograd graph (see _fsdp)
            grads = per_term_backward(items, params)
            reuse = False
        else:
            grads = term_grads(
                items,
                params,
                mode=mode,
                out=[self._stacks.get(p) for p in params] if reuse else None,
            )
        if mode == "auto" and not sharded:
            # remember what auto chose (saved in state_dict, so that a resumed run in
            # another process computes the per-term gradients the same way)
            self._resolved_grad_mode = _resolved_auto_mode(params, len(items))
        if reuse and (self._resolved_grad_mode if mode == "auto" else mode) == "sequential":
            self._stacks = {p: g for p, g in zip(params, grads) if g is not None}
        else:
            self._stacks = {}
        if scaling:
            assert grad_scaler is not None
            inv = grad_scaler._scale.double().reciprocal()  # type: ignore[union-attr]
        self._accum_scaled = self._accum_scaled or scaling
        for p, g in zip(params, grads):
            if g is None:
                continue
            if scaling:
                g = g.to(_state_dtype(p)).mul_(inv.to(g.device, _state_dtype(p)))
            prev = self._accum.get(p)
            self._accum[p] = g if prev is None else prev.add_(g.to(prev.dtype))
        if self._accum_losses is None:
            self._accum_losses = loss_vec
        else:
            self._accum_losses = self._accum_losses + loss_vec.to(self._accum_losses.device)

    @torch.compiler.disable
    @torch.no_grad()
    def step_with_grads(
        self,
        term_grads: Sequence[Sequence[Tensor | None]] | Mapping[Tensor, Tensor],
        losses: Sequence[Tensor] | Tensor | None = None,
    ) -> None:
        """Apply one update from per-term gradients the caller already computed.

        For AMP (unscale them first), gradient accumulation or a custom backward.

        Args:
            term_grads: either a sequence over terms of sequences over the optimizer's
                parameters (in ``param_groups`` order; ``None`` where a term does not reach
                a parameter), or a mapping ``param -> tensor of shape (I, *param.shape)``.
            losses: optional loss values; if given and not finite, the step is skipped.

        Raises ``RuntimeError`` while micro-batches from :meth:`accumulate` are pending
        (apply them with :meth:`step`, or drop them with :meth:`zero_grad`). The gradients
        may have any strides or memory format; they are copied, never modified.
        """
        if self._accum:
            raise RuntimeError(
                "MTAdam.step_with_grads cannot apply the micro-batches pending from "
                "accumulate(): call step() to apply them (or zero_grad() to drop them) first"
            )
        params = [p for group in self.param_groups for p in group["params"]]
        stacked: dict[Tensor, Tensor] = {}
        if isinstance(term_grads, Mapping):
            known = set(params)
            num = None
            for p, g in term_grads.items():
                if p not in known:
                    raise ValueError(
                        "term_grads has a tensor that is not one of the optimizer's parameters"
                    )
                if g is None:
                    continue
                if g.dim() != p.dim() + 1 or g.shape[1:] != p.shape:
                    raise ValueError(
                        f"per-term gradient of shape {tuple(g.shape)} does not match parameter "
                        f"of shape {tuple(p.shape)} (expected (I, *param.shape))"
                    )
                if num is not None and g.shape[0] != num:
                    raise ValueError("per-term gradients disagree on the number of terms")
                num = g.shape[0]
                self._check_dense(g)
                # the update scales the gradients in place (the caller's tensors stay
                # intact) and views each term's rows as one block (so any strides go)
                stacked[p] = g.clone(memory_format=torch.contiguous_format)
            if num is None:
                return
            self._check_num_terms(num)
        else:
            per_term = [list(t) for t in term_grads]
            if not per_term:
                raise ValueError("term_grads is empty: expected at least one term")
            for i, row in enumerate(per_term):
                if len(row) != len(params):
                    raise ValueError(
                        f"term {i} has {len(row)} gradients, expected one per parameter "
                        f"({len(params)}; None where the term does not reach it)"
                    )
            self._check_num_terms(len(per_term))
            k = len(per_term)
            for j, p in enumerate(params):
                col = [per_term[i][j] for i in range(k)]
                if all(g is None for g in col):
                    continue
                ref = next(g for g in col if g is not None)
                buf = ref.new_zeros((k, *p.shape))
                for i, gi in enumerate(col):
                    if gi is None:
                        continue
                    g = gi
                    if g.shape != p.shape:
                        raise ValueError(
                            f"gradient of term {i} has shape {tuple(g.shape)}, parameter "
                            f"{j} has shape {tuple(p.shape)}"
                        )
                    self._check_dense(g)
                    buf[i].copy_(g)
                stacked[p] = buf
        loss_vec = None
        if losses is not None:
            loss_vec = (
                losses.detach().reshape(-1)
                if isinstance(losses, Tensor)
                else torch.stack([torch.as_tensor(v).detach().reshape(()) for v in losses])
            )
        self._apply(stacked, loss_vec)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["mtadam"] = {
            "num_terms": self.num_terms,
            "skipped_steps": self.skipped_steps,
            "scaler_skipped_steps": self.scaler_skipped_steps,
            "grad_mode": self._resolved_grad_mode,
            "options": {name: getattr(self, name) for name in OPTIONS},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an MTAdam checkpoint, all or nothing.

        Everything is checked before anything changes: the param groups (count, sizes,
        hyperparameters), the options that shape the state (``grouping``,
        ``normalization``, ``second_moment``, ``magnitude_init``), the term count (against
        ``term_weights`` too) and, per parameter, the state's keys, shapes, dtypes and
        values (finite; second moments and magnitudes not negative). A mismatch raises a
        ``ValueError`` that names the parameter and leaves the optimizer as it was. State
        tensors are copied in the state dtype (float32 for bf16/fp16 parameters, never
        rounded to the parameter's dtype), so a resumed run continues bit-identically.
        Micro-batches pending from :meth:`accumulate` are dropped.
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop("mtadam", None)
        groups, state, num = self._checked_checkpoint(state_dict, extra)
        super().load_state_dict({**state_dict, "state": {}, "param_groups": groups})
        self.state.update(state)
        self._drop_accumulated()
        self._cache.clear()
        self._skipped = self._scaler_skipped = None
        self._pending = []
        self.num_terms = num
        extra = extra or {}
        self._skipped_host = int(extra.get("skipped_steps", 0))
        self._scaler_skipped_host = int(extra.get("scaler_skipped_steps", 0))
        self._resolved_grad_mode = extra.get("grad_mode")

    def _checked_checkpoint(
        self, sd: dict[str, Any], extra: Any
    ) -> tuple[list[dict[str, Any]], dict[Tensor, dict[str, Tensor]], int | None]:
        """The validated param groups, the state converted for each parameter, and I."""
        saved_groups, saved_state = sd.get("param_groups"), sd.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, Mapping):
            raise ValueError(
                "Invalid MTAdam checkpoint: expected an optimizer state_dict() with 'state' "
                "and 'param_groups'"
            )
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"Invalid MTAdam checkpoint: {len(saved_groups)} param groups, the optimizer "
                f"has {len(self.param_groups)}"
            )
        if extra is not None and not isinstance(extra, Mapping):
            raise ValueError("Invalid MTAdam checkpoint: 'mtadam' must be a dict")
        for name in OPTIONS:
            saved = (extra or {}).get("options", {}).get(name, getattr(self, name))
            if saved != getattr(self, name):
                raise ValueError(
                    f"Invalid MTAdam checkpoint: saved with {name}={saved!r}, this optimizer "
                    f"has {name}={getattr(self, name)!r}"
                )
        params: dict[Any, Tensor] = {}
        labels: dict[Any, str] = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            ids = list(saved.get("params", ()))
            if len(ids) != len(group["params"]):
                raise ValueError(
                    f"Invalid MTAdam checkpoint: param group {gi} has {len(ids)} parameters, "
                    f"the optimizer's has {len(group['params'])}"
                )
            names = saved.get("param_names") or group.get("param_names") or [None] * len(ids)
            for k, name, p in zip(ids, names, group["params"]):
                params[k] = p
                labels[k] = f"parameter {k}" + (f" ({name})" if name else "")
        num = extra.get("num_terms") if extra else None
        if num is None:
            num = next(
                (
                    int(s["magnitude"].shape[0])
                    for s in saved_state.values()
                    if isinstance(s, Mapping)
                    and isinstance(s.get("magnitude"), Tensor)
                    and s["magnitude"].dim() == 1
                ),
                None,
            )
        if num is not None and self.term_weights is not None and len(self.term_weights) != num:
            raise ValueError(
                f"term_weights has {len(self.term_weights)} entries but the checkpoint has "
                f"{num} terms"
            )
        state = {}
        for k, saved in saved_state.items():
            if k not in params:
                raise ValueError(
                    f"Invalid MTAdam checkpoint: state for parameter {k!r}, which is in no "
                    "param group"
                )
            _check_state_keys(f"Invalid MTAdam state for {labels[k]}", saved)
            if num is None:
                raise ValueError(f"Invalid MTAdam state for {labels[k]}: no term count")
            state[params[k]] = self._checked_state(labels[k], params[k], saved, num)
        # after the state, so that another optimizer's checkpoint is named as such first
        groups = [
            _checked_group(gi, saved, group)
            for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups))
        ]
        return groups, state, num

    def _checked_state(self, label: str, p: Tensor, saved: Any, num: int) -> dict[str, Tensor]:
        where = f"Invalid MTAdam state for {label}"
        _check_state_keys(where, saved)
        dt = _state_dtype(p)
        shapes = self._state_shapes(p, num)
        out = {}
        # the magnitudes first: their length is the term count, the likeliest mismatch
        for key in ("magnitude", "step", "exp_avg", "exp_avg_sq"):
            value = saved[key]
            if key == "step":
                value = torch.as_tensor(value)
            if not isinstance(value, Tensor):
                raise ValueError(f"{where}: {key} is a {type(value).__name__}, not a tensor")
            want = torch.float32 if key == "step" else dt.to_real() if key == "magnitude" else dt
            if value.is_complex() != want.is_complex or not (
                value.is_floating_point() or value.is_complex() or key == "step"
            ):
                raise ValueError(
                    f"{where}: {key} has dtype {value.dtype} (expected {want}, or another "
                    f"{'complex' if want.is_complex else 'floating-point'} dtype)"
                )
            if tuple(value.shape) != shapes[key] and not (key == "step" and value.numel() == 1):
                hint = f", one per term: num_terms={num}" if key == "magnitude" else ""
                raise ValueError(
                    f"{where}: {key} has shape {tuple(value.shape)} (expected {shapes[key]}{hint})"
                )
            if is_sharded(p) and key in ("exp_avg", "exp_avg_sq"):
                # sharded like the parameter, whether saved sharded (any layout) or whole
                prefix = shapes[key][: len(shapes[key]) - p.dim()]
                value = shard_like(value, sharded_zeros(p, prefix, want))
            else:
                value = value.to(
                    local(p).device, want, copy=True, memory_format=torch.contiguous_format
                )
                value = value.reshape(shapes[key])
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{where}: {key} is not finite (NaN or inf)")
            if key != "exp_avg" and bool((_real(value) < 0).any()):
                raise ValueError(f"{where}: {key} has negative entries")
            out[key] = value
        return {key: out[key] for key in STATE_KEYS}

    def _state_shapes(self, p: Tensor, num: int) -> dict[str, tuple[int, ...]]:
        shape = tuple(p.shape)
        return {
            "step": (),
            "exp_avg": (num, *shape) if self.second_moment == "own" else shape,
            "exp_avg_sq": shape if self.second_moment == "mean" else (num, *shape),
            "magnitude": (num,),
        }

    def __repr__(self) -> str:
        text = super().__repr__()
        options = (
            f"term_weights: {self.term_weights}\n"
            f"    grouping: {self.grouping}\n"
            f"    normalization: {self.normalization}\n"
            f"    second_moment: {self.second_moment}\n"
            f"    magnitude_init: {self.magnitude_init}\n"
            f"    grad_mode: {self.grad_mode}\n"
            f"    sync_free: {self.sync_free}\n"
            f"    fused: {self.fused}\n"
            f"    keep_stacks: {self.keep_stacks}\n"
        )
        head, _, rest = text.partition("\n")
        return f"{head}\nOptions\n    {options}{rest}"

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _check_dense(g: Tensor) -> None:
        if g.is_sparse:
            raise TypeError("MTAdam does not support sparse gradients")

    def _check_num_terms(self, num: int) -> None:
        if self.num_terms is None:
            if self.term_weights is not None and len(self.term_weights) != num:
                raise ValueError(
                    f"term_weights has {len(self.term_weights)} entries but {num} loss terms "
                    "were given"
                )
            self.num_terms = num
        elif num != self.num_terms:
            raise ValueError(
                f"MTAdam was stepped with {self.num_terms} loss terms before, got {num}: "
                "the number of terms is fixed at the first step"
            )

    def _init_state(self, p: Tensor, num: int) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            dt = _state_dtype(p)
            shapes = self._state_shapes(p, num)
            home = local(p).device
            state["step"] = torch.zeros((), dtype=torch.float32, device=home)
            # a sharded parameter's moments are sharded like it (DTensors, see _fsdp)
            for key in ("exp_avg", "exp_avg_sq"):
                prefix = shapes[key][: len(shapes[key]) - p.dim()]
                state[key] = sharded_zeros(p, prefix, dt)
            fill = 1.0 if self.magnitude_init == "one" else 0.0
            # complex parameters: complex moments (as torch.optim.Adam), real magnitudes
            state["magnitude"] = torch.full((num,), fill, dtype=dt.to_real(), device=home)
        return state

    def _apply(
        self, stacked: dict[Tensor, Tensor], loss_vec: Tensor | None, *, scaled: bool = False
    ) -> Tensor | None:
        capturing = _is_capturing(next(iter(stacked)).device) if stacked else False
        if not capturing:
            self._flush_pending()
        num = self.num_terms
        group = resolve_group(self.process_group)
        full_norms: dict[Tensor, Tensor] = {}
        if stacked and any(is_sharded(p) for p in stacked):
            self._check_sharded(group)
        if group is not None and num is not None:
            stacked, loss_vec, full_norms = self._all_reduce(stacked, loss_vec, num, group)
        if not stacked:
            return None
        assert num is not None
        groups = [[p for p in g["params"] if p in stacked] for g in self.param_groups]
        params = [p for ps in groups for p in ps]
        home = local(params[0]).device
        # One contiguous (I, *shape) block per parameter, whatever the caller's strides; a
        # complex parameter is updated as a view of real, as torch.optim.Adam does.
        grads = {
            p: _real(stacked[p].to(_state_dtype(p), memory_format=torch.contiguous_format))
            for p in params
        }
        # On the CPU the flag is read for free (no device to wait for): a bad step returns
        # here, and good steps skip the masking that keeps accelerator steps sync-free.
        masked = self.sync_free if self.sync_free is not None else home.type != "cpu"
        norms = _layer_norms(
            [grads[p] for p in params],
            self._layer_index(params, home),
            read_host=not masked,
            rows={k: full_norms[p] for k, p in enumerate(params) if p in full_norms},
        )
        finite = torch.isfinite(norms).all()
        quiet = None
        if loss_vec is not None:
            finite_losses = torch.isfinite(loss_vec.to(home)).all()
            if scaled:
                # finite losses whose scaled gradients overflowed: the GradScaler's back-off
                quiet = ~finite & finite_losses
            finite = finite & finite_losses
        if capturing:
            self._check_capturable(params, home, masked)
        if not masked and not bool(finite):
            self._record_finite(finite, masked, quiet=quiet)
            return finite
        weights = self._term_weight_tensor(home)
        fused = self.fused
        if fused is None:
            fused = home.type == "cuda" and fused_available(home)
        states = {p: self._init_state(p, num) for p in params}
        clips = self._clip_coefficients(
            groups, grads, states, norms, finite, weights, read_host=not masked
        )
        start = 0
        for group, ps, clip in zip(self.param_groups, groups, clips):
            if not ps:
                continue
            beta1, beta2, beta3 = group["betas"]
            # a sharded parameter and its moments are updated through their local shards
            mtadam(
                [_real(local(p)) for p in ps],
                [grads[p] for p in ps],
                [_real(local(states[p]["exp_avg"])) for p in ps],
                [_real(local(states[p]["exp_avg_sq"])) for p in ps],
                [states[p]["magnitude"] for p in ps],
                [states[p]["step"] for p in ps],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                beta3=beta3,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                term_weights=weights,
                normalization=self.normalization,
                second_moment=self.second_moment,
                magnitude_init=self.magnitude_init,
                threshold=self.threshold,
                norms=norms[start : start + len(ps)],
                finite=finite,
                masked=masked,
                clip=clip,
                fused=fused,
            )
            start += len(ps)
        self._record_finite(finite, masked, capturing, quiet=quiet)
        return finite

    def _clip_coefficients(
        self,
        groups: list[list[Tensor]],
        grads: dict[Tensor, Tensor],
        states: dict[Tensor, dict[str, Any]],
        norms: Tensor,
        finite: Tensor,
        weights: Tensor | None,
        *,
        read_host: bool,
    ) -> list[Tensor | None]:
        """Per param group, ``min(1, max_grad_norm / (||sum_i g~_i|| + 1e-6))``, the norm taken
        over every parameter of the step, as ``torch.nn.utils.clip_grad_norm_`` computes it."""
        limits = [g.get("max_grad_norm") for g in self.param_groups]
        if all(c is None for c in limits):
            return [None] * len(groups)
        home = norms.device
        total = torch.zeros((), dtype=torch.float64, device=home)
        start = 0
        for group, ps in zip(self.param_groups, groups):
            if not ps:
                continue
            gs = [grads[p] for p in ps]
            _, scale, _ = _balance_scales(
                gs,
                [states[p]["magnitude"] for p in ps],
                [states[p]["step"] for p in ps],
                norms[start : start + len(ps)],
                finite,
                beta3=group["betas"][2],
                normalization=self.normalization,
                magnitude_init=self.magnitude_init,
                term_weights=weights,
                threshold=self.threshold,
            )
            total = total + _balanced_sq_norm(gs, scale, read_host=read_host)
            start += len(ps)
        total = total.sqrt()
        out: list[Tensor | None] = []
        for c in limits:
            if c is None:
                out.append(None)
                continue
            coef = (float(c) / (total + 1e-6)).clamp(max=1.0)
            # a skipped step measures NaN; keep the (masked) scales finite
            out.append(torch.where(finite, coef, torch.ones_like(coef)))
        return out

    def _check_capturable(self, params: list[Tensor], home: torch.device, masked: bool) -> None:
        """Refuse to capture what a CUDA graph would replay wrongly."""
        if not masked:
            raise RuntimeError(
                "MTAdam(sync_free=False) reads the finite flag on the host, which CUDA graph "
                "capture forbids: use sync_free=True (the default on CUDA)"
            )
        ready = (
            all(len(self.state[p]) > 0 for p in params)
            and self._skipped is not None
            and self._skipped.device == home
            and (self.term_weights is None or ("weights", home) in self._cache)
            and (
                self.grouping == "parameter"
                or ("layers", (tuple(id(p) for p in params), home)) in self._cache
            )
        )
        if not ready:
            raise RuntimeError(
                "MTAdam: run at least one eager step before capturing step() in a CUDA graph "
                "(warm-up on a side stream, as the torch.cuda.graph docs describe): the state "
                "would be allocated and zeroed inside the graph, and reset at every replay"
            )

    def _check_sharded(self, group: Any) -> None:
        """Refuse what the sharded (FSDP2) path cannot do right."""
        if any(g.get("max_grad_norm") is not None for g in self.param_groups):
            raise ValueError(
                "MTAdam(max_grad_norm=...) is not supported on sharded (fully_shard) "
                "parameters yet: its global norm would need a second collective"
            )
        if group is None:
            mesh = next(
                p.device_mesh  # type: ignore[attr-defined]
                for g in self.param_groups
                for p in g["params"]
                if is_sharded(p)
            )
            if mesh.size() > 1:
                raise ValueError(
                    "MTAdam on sharded (fully_shard) parameters needs the process group of "
                    "their mesh: a layer's magnitude sums the ranks' shards (got "
                    f"process_group={self.process_group!r}; pass 'auto' or the mesh's group)"
                )

    def _all_reduce(
        self, stacked: dict[Tensor, Tensor], loss_vec: Tensor | None, num: int, group: Any
    ) -> tuple[dict[Tensor, Tensor], Tensor, dict[Tensor, Tensor]]:
        """Average per-term gradients and losses over the ranks in one collective.

        Every parameter that requires grad takes part, zeros where no term reached it on
        this rank, with a flag saying whether one did, so that all ranks send the same
        layout. A parameter that some rank reached gets the mean over all ranks, zeros
        included: one process on the concatenated batch (mean-reduced losses on equal
        shards), where the samples of the other ranks contribute nothing to it. A parameter
        that no rank reached is left out, as one process leaves it (its step counter,
        moments and magnitudes do not move). A NaN on any rank reaches every rank through
        the sum, so all ranks skip that step together.

        The flags are read on the host only when this rank missed some parameter (else
        every rank's union is all of them), so a step that reaches every parameter stays
        sync-free. Before the all-reduce, :func:`check_layout` (one all-gather of 8
        integers) compares the number of terms and the parameters' count and sizes: ranks
        that differ raise the same error instead of aborting in gloo.

        Sharded (FSDP2) parameters arrive averaged by FSDP's reduce-scatter as local
        shards: they are not averaged again; the squared norms of their shards, per term,
        are summed in the same collective instead, and returned as the ``(I,)`` float64
        norms of the whole tensors.
        """
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        home = local(params[0]).device if params else torch.device("cpu")
        count, elements, order = layout_of(params)
        check_layout(
            "MTAdam.step",
            1,
            [
                ("has {} loss terms", num),
                ("has {} parameters that require grad", count),
                ("has {} parameter elements", elements),
                ("orders its parameters' sizes differently (checksum {})", order),
            ],
            group,
            home,
        )
        reached = [p in stacked for p in params]
        grads = [
            stacked[p].to(_state_dtype(p))
            if hit
            else torch.zeros((num, *local(p).shape), dtype=_state_dtype(p), device=home)
            for p, hit in zip(params, reached, strict=True)
        ]
        sharded = [is_sharded(p) for p in params]
        if loss_vec is None:
            loss_vec = torch.zeros(num, device=home)
        # all reached (the usual step): made on the device, no blocking host-to-device copy
        flags = (
            torch.ones(len(params), device=home)
            if all(reached)
            else torch.tensor(reached, dtype=torch.float32).to(home)
        )
        plain = [g for g, s in zip(grads, sharded) if not s]
        shards = [_real(g) for g, s in zip(grads, sharded) if s]
        squares = [_layer_norms(shards, None, read_host=True).square()] if shards else []
        (*averaged, losses, hits), summed = all_reduce_mean_and_sum(
            [*plain, loss_vec, flags], squares, group
        )
        keep = reached if all(reached) else [h > 0 for h in hits.tolist()]
        out, full = {}, {}
        rows = iter(averaged)
        sharded_norms = iter(summed[0].sqrt().unbind(0)) if shards else iter(())
        for p, g, k, s in zip(params, grads, keep, sharded, strict=True):
            g = g if s else next(rows)
            norm = next(sharded_norms) if s else None
            if k:
                out[p] = g
                if norm is not None:
                    full[p] = norm
        return out, losses, full

    def _layer_index(self, params: list[Tensor], home: torch.device) -> Tensor | None:
        """Layer id of each parameter (cached), or None when each tensor is a layer."""
        if self.grouping == "parameter":
            return None
        key = (tuple(id(p) for p in params), home)
        cached = self._cache.get(("layers", key))
        if cached is not None:
            return cached
        if self.grouping == "global":
            ids = [0] * len(params)
        else:
            # a layer is (param group, module path), so equal names in two groups differ
            layer: dict[Tensor, tuple[int, str]] = {}
            for gi, group in enumerate(self.param_groups):
                for name, p in zip(group["param_names"], group["params"]):
                    layer[p] = (gi, name.rpartition(".")[0])
            seen: dict[tuple[int, str], int] = {}
            ids = [seen.setdefault(layer[p], len(seen)) for p in params]
        index = torch.tensor(ids, dtype=torch.long).to(home)
        self._cache[("layers", key)] = index
        return index

    def _term_weight_tensor(self, home: torch.device) -> Tensor | None:
        if self.term_weights is None:
            return None
        cached = self._cache.get(("weights", home))
        if cached is None:
            cached = torch.tensor(self.term_weights, dtype=torch.float64).to(home)
            self._cache[("weights", home)] = cached
        return cached

    def _record_finite(
        self,
        finite: Tensor,
        masked: bool,
        capturing: bool = False,
        quiet: Tensor | None = None,
    ) -> None:
        """Count a skipped step: in ``skipped_steps`` (and warn), or, where ``quiet`` is
        true (a GradScaler overflow), in ``scaler_skipped_steps`` without a word."""
        ok = finite if quiet is None else finite | quiet
        if self._skipped is None or self._skipped.device != finite.device:
            if self._skipped is not None:
                self._skipped_host += int(self._skipped.item())
            if self._scaler_skipped is not None:
                self._scaler_skipped_host += int(self._scaler_skipped.item())
            self._skipped = torch.zeros((), dtype=torch.int64, device=finite.device)
            self._scaler_skipped = torch.zeros((), dtype=torch.int64, device=finite.device)
        assert self._scaler_skipped is not None
        self._skipped.add_((~ok).to(torch.int64))
        if quiet is not None:
            self._scaler_skipped.add_(quiet.to(torch.int64))
        if capturing:
            # a replay only advances the device counter; the pinned copy and event below
            # are host-side objects that a graph cannot renew at each replay
            return
        if not masked:
            if not bool(ok):
                self._warn_skip()
            return
        # Read the flag later without blocking: copy it to the host asynchronously and
        # look at it once the copy has completed (at a later step or skipped_steps).
        host = torch.empty((), dtype=torch.bool, pin_memory=torch.cuda.is_available())
        host.copy_(ok, non_blocking=True)
        event = torch.cuda.Event() if finite.device.type == "cuda" else None
        if event is not None:
            event.record()
        self._pending.append((event, host))

    def _flush_pending(self) -> None:
        keep = []
        for event, host in self._pending:
            if event is not None and not event.query():
                keep.append((event, host))
            elif not bool(host):
                self._warn_skip()
        self._pending = keep

    @staticmethod
    def _warn_skip() -> None:
        warn_once(
            "mtadam-skip",
            "MTAdam skipped a step: a loss or gradient was not finite (NaN/Inf); "
            "parameters and state were left untouched. See MTAdam.skipped_steps.",
            stacklevel=4,
        )


def _check_state_keys(where: str, saved: Any) -> None:
    if not isinstance(saved, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(saved).__name__}")
    for key in STATE_KEYS:
        if key not in saved:
            raise ValueError(
                f"{where}: missing {key!r} (expected {', '.join(STATE_KEYS)}: is this an "
                "MTAdam checkpoint? Another optimizer's state cannot be loaded)"
            )
    for key in saved:
        if key not in STATE_KEYS:
            raise ValueError(f"{where}: unknown key {key!r} (expected {', '.join(STATE_KEYS)})")


def _check_max_grad_norm(value: Any) -> None:
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"Invalid max_grad_norm: {value!r} (expected a float or None)")
        check_positive("max_grad_norm", float(value))


GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay")


def _checked_group(index: int, saved: Mapping[str, Any], group: dict[str, Any]) -> dict[str, Any]:
    """A saved param group, validated as the constructor validates its hyperparameters."""
    where = f"in param group {index}"
    for key in GROUP_KEYS:
        if key not in saved:
            raise ValueError(f"Invalid MTAdam checkpoint: {key!r} is missing {where}")
    out = dict(saved)
    # checkpoints from before max_grad_norm keep the optimizer's own setting
    out.setdefault("max_grad_norm", group.get("max_grad_norm"))
    betas = out["betas"]
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 3
        or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ValueError(
            f"Invalid betas {where}: {betas!r} (expected (beta1, beta2, beta3), each in [0, 1))"
        )
    try:
        for key, name in (
            ("lr", "learning rate"),
            ("eps", "eps"),
            ("weight_decay", "weight_decay"),
        ):
            if isinstance(out[key], Tensor):
                raise ValueError(f"Invalid {name}: a tensor (expected a float)")
            check_nonneg(name, out[key])
        _check_max_grad_norm(out["max_grad_norm"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{err} {where} of the checkpoint") from None
    return out


def _resolved_auto_mode(params: list[Tensor], num_terms: int) -> str | None:
    """The mode that ``term_grads(mode="auto")`` uses for these parameters and K."""
    if num_terms <= 1:
        return "sequential"
    return _vjp.cached_choice(auto_key(params, num_terms))


def _is_capturing(device: torch.device) -> bool:
    """Whether ``step()`` is being captured into a CUDA graph on this thread."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _report_to_scaler(scaler: torch.amp.GradScaler, optimizer: Optimizer, finite: Tensor) -> None:
    """Tell ``scaler.update()`` whether this step found inf/NaN, as its own step would."""
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states[id(optimizer)]
    state["found_inf_per_device"][finite.device] = (~finite).to(torch.float32)
    state["stage"] = OptState.STEPPED


Bucket = tuple[torch.device, torch.dtype]


def _buckets(grads: list[Tensor]) -> dict[Bucket, list[int]]:
    """Indices of the tensors of each (device, dtype), as torch.optim's foreach paths group."""
    out: dict[Bucket, list[int]] = {}
    for k, g in enumerate(grads):
        out.setdefault((g.device, g.dtype), []).append(k)
    return out


def _in_order(blocks: list[Tensor], buckets: dict[Bucket, list[int]]) -> Tensor:
    """Rows of per-bucket blocks (already on one device and dtype) in the original order."""
    if len(blocks) == 1:
        return blocks[0]
    rows: dict[int, Tensor] = {}
    for block, idx in zip(blocks, buckets.values()):
        rows.update(zip(idx, block.unbind(0)))
    return torch.stack([rows[k] for k in range(len(rows))])


# 2^-100: brings a float32 norm that overflowed (above ~1.8e19) back into range, exactly
_NORM_SHRINK = 2.0**-100


def _norms(tensors: list[Tensor], read_host: bool) -> Tensor:
    """float64 2-norms of same-dtype tensors (``_foreach_norm``), without overflow.

    Below float64, ``_foreach_norm`` sums the squares in the tensor's dtype, so a float32
    norm above ~1.8e19 is inf although every entry is finite. On CUDA, asking for a float64
    result makes the fused kernel accumulate in float64 (one pass, no copy). Elsewhere (the
    CPU runs that variant as a float64 copy per tensor, 8x slower) overflowed norms are
    measured again from the tensors scaled by 2^-100 (exact): with ``read_host`` only when
    one overflowed, else for all (a masked step cannot branch on a device value).
    """
    if tensors[0].dtype == torch.float64:
        return torch.stack(torch._foreach_norm(tensors))
    if tensors[0].device.type == "cuda":
        return torch.stack(torch._foreach_norm(tensors, 2, torch.float64))
    norms = torch.stack(torch._foreach_norm(tensors))
    overflow = torch.isinf(norms)
    if read_host and not bool(overflow.any()):
        return norms.double()
    shrunk = torch.stack(torch._foreach_norm(torch._foreach_mul(tensors, _NORM_SHRINK)))
    return torch.where(overflow, shrunk.double() / _NORM_SHRINK, norms.double())


def _layer_norms(
    grads: list[Tensor],
    layer_index: Tensor | None,
    *,
    read_host: bool = False,
    rows: Mapping[int, Tensor] | None = None,
) -> Tensor:
    """(P, I) float64 magnitudes ||g_{i,l}|| of each parameter's layer, per term.

    One ``_foreach_norm`` over the per-term views of all tensors of a (device, dtype)
    (see :func:`_norms` for the overflow guard). ``rows`` replaces the measured ``(I,)``
    norms of some tensors before they are grouped into layers (the whole-tensor norms of
    sharded parameters, of which ``grads`` holds only the local shards).
    """
    home = grads[0].device
    num = grads[0].shape[0]
    buckets = _buckets(grads)
    blocks = []
    for idx in buckets.values():
        terms = [t for k in idx for t in grads[k].unbind(0)]
        norms = _norms(terms, read_host).view(len(idx), num)
        blocks.append(norms.to(home, torch.float64))
    norms = _in_order(blocks, buckets)
    if rows:
        norms = norms.clone()
        for k, row in rows.items():
            norms[k] = row.to(home, torch.float64)
    if layer_index is None:
        return norms
    sq = torch.zeros((len(grads), num), dtype=torch.float64, device=home)
    sq.index_add_(0, layer_index, norms.square())
    return sq.sqrt().index_select(0, layer_index)


def _reduce_terms(
    tensors: list[Tensor], num: int, out_of_place: Any, in_place: Any
) -> list[Tensor]:
    """Reduce each ``(I, *shape)`` tensor over its first dimension with a pairwise tree of
    foreach ops (about log2(I) ops in all, whatever the number of tensors). ``tensors`` are
    left intact; with ``I = 1`` the result is a view of them."""
    cur, n, owned = tensors, num, False
    while n > 1:
        h = n // 2
        lo, hi = [t[:h] for t in cur], [t[h : 2 * h] for t in cur]
        if owned:
            in_place(lo, hi)
            res = lo
        else:
            res, owned = out_of_place(lo, hi), True
        if n % 2:
            in_place([r[:1] for r in res], [t[2 * h :] for t in cur])
        cur, n = res, h
    return [t[0] for t in cur]


def _max_over_terms(tensors: list[Tensor], num: int) -> list[Tensor]:
    """The max over the first dimension of each ``(I, *shape)`` tensor. On the CPU, where
    an op costs no launch, one ``amax`` per tensor reads the second moments once (the
    foreach tree below reads them about twice and runs as the slower ``clamp_min``: 1.5x
    slower updates at 10M parameters); on accelerators the pairwise tree keeps the launch
    count at about log2(I) whatever the number of tensors."""
    if tensors and tensors[0].device.type == "cpu":
        return [t.amax(dim=0) for t in tensors]
    return _reduce_terms(tensors, num, torch._foreach_maximum, torch._foreach_maximum_)


def _sum_terms(tensors: Sequence[Tensor], row: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """``row @ t.view(I, -1)`` for each tensor: a weighted sum over terms, one foreach op.
    ``row`` is one ``(1, I)`` row for every tensor, or one row per tensor."""
    rows = [row] * len(tensors) if isinstance(row, Tensor) else list(row)
    out = torch._foreach_mm(rows, [t.view(t.shape[0], -1) for t in tensors])
    return [o.view(t.shape[1:]) for o, t in zip(out, tensors)]


def mtadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    magnitudes: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    term_weights: Tensor | None = None,
    normalization: str = "anchor",
    second_moment: str = "max",
    magnitude_init: str = "first",
    threshold: float | None = None,
    norms: Tensor | None = None,
    finite: Tensor | None = None,
    masked: bool = True,
    clip: Tensor | None = None,
    fused: bool = False,
) -> Tensor:
    """Functional MTAdam update of one parameter group (math in :class:`MTAdam`), in place.

    Multi-tensor: the per-layer scalars (magnitude EMAs, anchors, scales, bias corrections)
    are one ``(P, I)`` computation, and the element-wise work runs as ``torch._foreach_*``
    ops over all tensors of each (device, dtype), so the number of ops does not grow with
    the number of parameter tensors (the masked path adds one ``masked_fill_`` per tensor).

    Args:
        params: the P parameter tensors to update.
        grads: per parameter, the stacked per-term gradients ``(I, *p.shape)`` in the state
            dtype. They may be overwritten with the balanced gradients (the CPU path of a
            finite step leaves them intact).
        exp_avgs: per parameter ``sum_i m_i`` (``(I, *p.shape)`` for ``second_moment="own"``).
        exp_avg_sqs: per parameter the ``v_i`` stacked over terms (``p.shape``, the mean over
            terms, for ``second_moment="mean"``).
        magnitudes: per parameter the ``(I,)`` magnitude EMAs.
        steps: per parameter the 0-dim step counter.
        lr, beta1, beta2, beta3, eps, weight_decay, decoupled_weight_decay: as in
            :class:`MTAdam`.
        term_weights: ``(I,)`` multipliers, or ``None``.
        normalization, second_moment, magnitude_init: as in :class:`MTAdam`.
        threshold: ``None`` (default) for the relative pass-through rule of
            :class:`MTAdam`; a float for an absolute one (the authors' code used ``1e-10``).
        norms: ``(P, I)`` float64 layer magnitudes of this step; computed per tensor from
            ``grads`` (one ``_foreach_norm``) if ``None`` (the optimizer passes them for
            module/global grouping).
        finite: 0-dim bool; when ``False`` nothing changes. Computed from ``norms`` if
            ``None``.
        masked: apply ``finite`` by masking, without reading it on the host (default). With
            ``False`` the caller guarantees that ``finite`` is true, and the masking passes
            are skipped.
        clip: optional 0-dim float64 factor that multiplies every balanced gradient before
            the moments (``MTAdam(max_grad_norm=...)``'s clip coefficient).
        fused: run each bucket's element-wise update compiled
            (:func:`lossbalance.optim._fused.fused_update`); a bucket that cannot be compiled
            takes the multi-tensor path.

    Returns:
        The 0-dim bool ``finite`` flag. No host synchronisation happens.
    """
    home = params[0].device
    num = grads[0].shape[0]
    count = len(params)
    buckets = _buckets(grads)
    if norms is None:
        norms = _layer_norms(grads, None, read_host=not masked)
    if finite is None:
        finite = torch.isfinite(norms).all()
    keep = finite.to(torch.float64)

    new_mags, scale, step_old = _balance_scales(
        grads,
        magnitudes,
        steps,
        norms,
        finite,
        beta3=beta3,
        normalization=normalization,
        magnitude_init=magnitude_init,
        term_weights=term_weights,
        threshold=threshold,
    )
    if clip is not None:
        scale = scale * clip.to(home, torch.float64)

    # A skipped first step leaves step == 0; the clamp keeps the (unused) factors finite.
    step_c = (step_old + keep).clamp(min=1.0)
    if home.type == "cpu":
        # As torch.optim.Adam computes them: Python's ``**`` (libm). A vectorised
        # torch.pow can differ from it in the last bit, depending on the CPU's instruction
        # set, and a single term would then no longer reproduce Adam bit for bit. On the
        # CPU, reading the steps is no synchronisation.
        host = step_c.tolist()
        bc1 = torch.tensor([1.0 - beta1**t for t in host], dtype=torch.float64)
        bc2_sqrt = torch.tensor([(1.0 - beta2**t) ** 0.5 for t in host], dtype=torch.float64)
    else:
        bc1 = 1.0 - torch.pow(beta1, step_c)
        bc2_sqrt = (1.0 - torch.pow(beta2, step_c)).sqrt()
    step_size = torch.full_like(bc1, -lr).div_(bc1) * keep
    shared = torch.stack(
        [
            (1.0 - beta1) * keep,  # first-moment rate
            beta2 * keep + (1.0 - keep),  # second-moment decay
            1.0 - lr * weight_decay * keep,  # decoupled decay
            1.0 - keep,  # 1 on a skipped step
        ]
    )
    # columns: scale (I) | new magnitudes (I) | bc2_sqrt | step_size | shared (4)
    table = torch.cat(
        [scale, new_mags, bc2_sqrt.unsqueeze(1), step_size.unsqueeze(1), shared.expand(count, 4)],
        dim=1,
    )
    rows = table.unbind(0) if len(buckets) > 1 else ()
    skip = ~finite

    for (dev, dt), idx in buckets.items():
        tab = (table if not rows else torch.stack([rows[k] for k in idx])).to(dev, dt)
        ps = [params[k] for k in idx]
        gs = [grads[k] for k in idx]
        ms = [exp_avgs[k] for k in idx]
        vs = [exp_avg_sqs[k] for k in idx]
        if fused and fused_update(
            ps,
            gs,
            ms,
            vs,
            [magnitudes[k] for k in idx],
            [steps[k] for k in idx],
            tab,
            finite.to(dev),
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            second_moment=second_moment,
            masked=masked,
        ):
            continue
        rate1, decay2, shrink, skipped = tab[0, 2 * num + 2 :].unbind(0)
        torch._foreach_copy_([magnitudes[k] for k in idx], tab[:, num : 2 * num].unbind(0))
        torch._foreach_add_([steps[k] for k in idx], [finite.to(dev, torch.float32)] * len(idx))
        bc2s = tab[:, 2 * num].unbind(0)
        sizes = tab[:, 2 * num + 1].unbind(0)

        # low-precision parameters: the update is computed in the float32 state dtype
        masters = ps if all(p.dtype == dt for p in ps) else [p.to(dt) for p in ps]
        if (
            dev.type == "cpu"
            and not masked
            and second_moment != "own"
            and (weight_decay == 0 or decoupled_weight_decay)
            and _foldable(tab[:, :num], beta2, dt)
        ):
            # The memory-bound CPU path: the scales are folded into the consumers instead
            # of a read-write pass g *= s over the (I, |p|) stack: the first moment's sum
            # over terms is one GEMV per tensor, the second moment adds s_i^2 g_i^2 per term.
            _fold_moments(ms, vs, gs, tab[:, :num], beta1, beta2, second_moment)
        else:
            _scaled_moments(
                ms,
                vs,
                gs,
                masters,
                tab,
                num,
                dev,
                dt,
                skip,
                rate1,
                decay2,
                beta1=beta1,
                beta2=beta2,
                weight_decay=weight_decay,
                decoupled_weight_decay=decoupled_weight_decay,
                second_moment=second_moment,
                masked=masked,
            )
        if weight_decay != 0 and decoupled_weight_decay:
            torch._foreach_mul_(masters, shrink)
        if second_moment == "max":
            vs = _max_over_terms(vs, num)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, list(bc2s))
        torch._foreach_add_(denom, eps)
        if eps == 0 and masked:
            # 0/0 where a coordinate never had a gradient: a skipped step must stay a no-op
            torch._foreach_add_(denom, [skipped] * len(denom))  # type: ignore[arg-type]
        # (step_size * m) / denom, in the order torch.optim.Adam's addcdiv_ uses
        scaled = torch._foreach_mul(ms, list(sizes))
        if second_moment == "own":
            torch._foreach_div_(scaled, denom)
            torch._foreach_add_(
                masters, _sum_terms(scaled, torch.ones((1, num), dtype=dt, device=dev))
            )
        else:
            torch._foreach_addcdiv_(masters, scaled, denom)
        if masters is not ps:
            torch._foreach_copy_(ps, masters)
    return finite


def _balance_scales(
    grads: list[Tensor],
    magnitudes: list[Tensor],
    steps: list[Tensor],
    norms: Tensor,
    finite: Tensor,
    *,
    beta3: float,
    normalization: str,
    magnitude_init: str,
    term_weights: Tensor | None,
    threshold: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The updated magnitude EMAs, the scales ``w_i n_a / n_i`` (both ``(P, I)``) and the
    old step counts ``(P,)``, float64 on the first tensor's device; nothing is written."""
    home = grads[0].device
    buckets = _buckets(grads)
    keep = finite.to(torch.float64)
    # the per-layer scalars of all tensors as (P, I) and (P,) float64 tensors on `home`
    mags = _in_order(
        [
            torch.stack([magnitudes[k] for k in idx]).to(home, torch.float64)
            for idx in buckets.values()
        ],
        buckets,
    )
    step_old = _in_order(
        [torch.stack([steps[k] for k in idx]).to(home, torch.float64) for idx in buckets.values()],
        buckets,
    )
    if magnitude_init == "first":
        rate = torch.where(step_old == 0, torch.ones_like(step_old), 1.0 - beta3).unsqueeze(1)
    else:
        rate = torch.full_like(step_old, 1.0 - beta3).unsqueeze(1)
    measured = torch.where(finite, norms, mags)
    new_mags = torch.lerp(mags, measured, rate * keep)

    if threshold is None:
        # Relative and dtype-aware: a term passes unscaled where its magnitude is at most
        # tiny * max(1, largest magnitude of the layer), tiny the smallest normal number of
        # the state dtype. So an exactly zero term passes, any ratio the dtype resolves is
        # scaled, and n_a / n_i < 1 / tiny stays finite in that dtype.
        tiny = max(torch.finfo(dt).tiny for _, dt in buckets)
        limit = new_mags.amax(dim=1, keepdim=True).clamp(min=1.0) * tiny
        above = new_mags > limit
    else:
        above = new_mags > threshold
    if normalization == "anchor":
        anchor = new_mags.gather(1, above.to(torch.uint8).argmax(dim=1, keepdim=True))
        scale = torch.where(above, anchor / new_mags, 1.0)
    elif normalization == "unit":
        scale = torch.where(above, 1.0 / new_mags, 1.0)
    else:
        scale = torch.ones_like(new_mags)
    if term_weights is not None:
        scale = scale * term_weights.to(home).unsqueeze(0)
    return new_mags, scale, step_old


def _balanced_sq_norm(grads: list[Tensor], scale: Tensor, *, read_host: bool) -> Tensor:
    """``sum_l ||sum_i scale_{l,i} g_{i,l}||^2`` as a 0-dim float64 tensor (for clipping)."""
    home = grads[0].device
    buckets = _buckets(grads)
    rows = scale.unbind(0)
    total = torch.zeros((), dtype=torch.float64, device=home)
    for (dev, dt), idx in buckets.items():
        tab = torch.stack([rows[k] for k in idx]).to(dev, dt)
        sums = _sum_terms([grads[k] for k in idx], [r.view(1, -1) for r in tab.unbind(0)])
        total = total + _norms(sums, read_host).to(home).square().sum()
    return total


def _scaled_moments(
    ms: list[Tensor],
    vs: list[Tensor],
    gs: list[Tensor],
    masters: list[Tensor],
    tab: Tensor,
    num: int,
    dev: torch.device,
    dt: torch.dtype,
    skip: Tensor,
    rate1: Tensor,
    decay2: Tensor,
    *,
    beta1: float,
    beta2: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    second_moment: str,
    masked: bool,
) -> None:
    """The moments from the stacks scaled in place (``g *= s``): every device and option."""
    trailing = [(1,) * (g.dim() - 1) for g in gs]
    torch._foreach_mul_(gs, [s.view(num, *t) for s, t in zip(tab[:, :num].unbind(0), trailing)])
    if weight_decay != 0 and not decoupled_weight_decay:
        torch._foreach_add_([g[0] for g in gs], masters, alpha=weight_decay)
    if masked:
        # no foreach op maps NaN to 0 (x * 0 stays NaN), so this one is per tensor
        skip_dev = skip.to(dev)
        for g in gs:
            g.masked_fill_(skip_dev, 0.0)

    ones = torch.ones((1, num), dtype=dt, device=dev)
    firsts = gs if second_moment == "own" else _sum_terms(gs, ones)
    if masked:
        torch._foreach_lerp_(ms, firsts, [rate1] * len(ms))
    else:
        torch._foreach_lerp_(ms, firsts, 1.0 - beta1)
    torch._foreach_mul_(vs, decay2)
    if second_moment == "mean":
        mean_row = torch.full((1, num), 1.0 / num, dtype=dt, device=dev)
        torch._foreach_add_(vs, _sum_terms(torch._foreach_mul(gs, gs), mean_row), alpha=1.0 - beta2)
    else:
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)


def _foldable(scales: Tensor, beta2: float, dtype: torch.dtype) -> bool:
    """Whether :func:`_fold_moments` may run: it multiplies ``(1 - beta2) s_i^2`` into
    ``g_i^2``, and that factor (with a margin for the products) must be a normal number of
    the dtype; a term scaled by ~1e-15 (float32) would flush it to zero and one scaled up
    by ~1e20 overflow ``g_i^2``. Host values: for the CPU path only."""
    info = torch.finfo(dtype)
    sq = scales.double().square() * (1.0 - beta2)
    ok = (sq == 0) | ((sq > info.tiny * 2.0**24) & (sq < info.max * 2.0**-24))
    return bool(ok.all())


def _fold_moments(
    ms: list[Tensor],
    vs: list[Tensor],
    gs: list[Tensor],
    scales: Tensor,
    beta1: float,
    beta2: float,
    second_moment: str,
) -> None:
    """The moments from the unscaled stacks, with the ``(n, I)`` scales folded in.

    ``m <- lerp(m, s @ g, 1 - beta1)`` (one GEMV per tensor) and ``v_i <- beta2 v_i +
    (1 - beta2) s_i^2 g_i^2`` (``addcmul`` per term with a per-term value), or for
    ``second_moment="mean"`` ``v <- beta2 v + (1 - beta2) (s^2 / I) @ g^2``. One
    read-write pass over the stack fewer than scaling it in place first (about a tenth of
    the update); ``gs`` is left intact. Host-side
    per-term values: for the CPU path of a step known to be finite only (no device to
    wait for, no masking).
    """
    num = scales.shape[1]
    rows = [r.view(1, num) for r in scales.unbind(0)]
    torch._foreach_lerp_(ms, _sum_terms(gs, rows), 1.0 - beta1)
    torch._foreach_mul_(vs, beta2)
    sq = scales * scales
    rate2 = 1.0 - beta2
    if second_moment == "mean":
        sq_rows = [r.view(1, num) for r in (sq / num).unbind(0)]
        torch._foreach_add_(vs, _sum_terms(torch._foreach_mul(gs, gs), sq_rows), alpha=rate2)
        return
    values = (sq * rate2).reshape(-1).tolist()
    terms = [g[i] for g in gs for i in range(num)]
    torch._foreach_addcmul_([v[i] for v in vs for i in range(num)], terms, terms, values)


register(
    MethodInfo(
        name="mtadam",
        factory=lambda num_terms, **kw: MTAdam,
        needs="optimizer",
        stateful=True,
        paper="Malkiel & Wolf 2020, arXiv 2006.14683",
        summary="Adam that scales every term's gradient to the anchor's magnitude per layer",
    )
)
