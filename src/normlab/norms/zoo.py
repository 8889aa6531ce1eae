"""The norms beyond LayerNorm/RMSNorm: ScaleNorm, PowerNorm, masked BatchNorm, DyT, none.

Each class's first docstring line is its equation and paper (shown by ``normlab norms``).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from normlab.errors import NormArgumentError, NormDtypeError
from normlab.norms.base import ResidualNorm
from normlab.norms.registry import check_size, register_norm
from normlab.ops.eager import refuse_second_derivative
from normlab.ops.reference import compute_dtype

_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_last_dim(name: str, x: Tensor, dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected input to be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _COMPUTE_DTYPES:  # (float8: torch's ops do not compute in it, as normlab's refuse it)
        raise NormDtypeError(f"{name}: expected input to have a floating-point dtype (float16, bfloat16, "
                             f"float32 or float64), got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != dim:
        raise NormArgumentError(
            f"{name}: expected input with shape [*, {dim}], but got input of size{list(x.shape)}"
        )


def _check_number(name: str, arg: str, value: object, low: float, high: float = math.inf, *,
                  low_open: bool = False, high_open: bool = False) -> float:
    """A hyperparameter: a finite real number in [low, high] (an end excluded where open),
    returned as a float (a numpy scalar, a Fraction, ... taken)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and (
        value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        where = (f"{'(' if low_open or low == -math.inf else '['}{low:g}, "
                 f"{high:g}{')' if high_open or high == math.inf else ']'}")
        raise NormArgumentError(f"{name}: expected {arg} to be a finite number in {where}, got {value!r}")
    return float(value)


def _valid_positions(name: str, x: Tensor, padding_mask: Tensor | None) -> Tensor:
    """A float [*x.shape[:-1], 1] tensor: 1 at real positions, 0 at padded ones."""
    if padding_mask is None:
        return x.new_ones((*x.shape[:-1], 1), dtype=compute_dtype(x.dtype))
    if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool or \
            tuple(padding_mask.shape) != tuple(x.shape[:-1]):
        got = (f"{list(padding_mask.shape)} {padding_mask.dtype}" if isinstance(padding_mask, Tensor)
               else type(padding_mask).__name__)
        raise NormArgumentError(
            f"{name}: expected padding_mask of shape {list(x.shape[:-1])} (the input's shape "
            f"without the channel dim) and dtype torch.bool (True = padded), got {got}"
        )
    if padding_mask.device != x.device:
        raise NormArgumentError(f"{name}: expected padding_mask on {x.device}, got {padding_mask.device}")
    return (~padding_mask).unsqueeze(-1).to(compute_dtype(x.dtype))


@register_norm("scalenorm")
class ScaleNorm(ResidualNorm, nn.Module):
    """y = g * x / max(||x||_2, eps), one learnable scalar g = sqrt(d) at init (Nguyen & Salazar 2019, "Transformers without Tears")."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        dim = check_size("ScaleNorm", "dim", dim)
        eps = _check_number("ScaleNorm", "eps", eps, 0.0, low_open=True)
        self.dim, self.eps = dim, eps
        self.g = nn.Parameter(torch.empty((), device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.g, math.sqrt(self.dim))

    def normalize(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        _check_last_dim("ScaleNorm", x, self.dim)
        xf = x.to(compute_dtype(x.dtype))
        norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).clamp_min(self.eps)
        return (self.g * xf / norm).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


@register_norm("dyt")
class DyT(ResidualNorm, nn.Module):
    """y = gamma * tanh(alpha * x) + beta, alpha a learnable scalar (Zhu et al. 2025, "Transformers without Normalization")."""

    def __init__(self, dim: int, alpha_init: float = 0.5, elementwise_affine: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        dim = check_size("DyT", "dim", dim)
        alpha_init = _check_number("DyT", "alpha_init", alpha_init, -math.inf)
        self.dim, self.alpha_init = dim, alpha_init
        factory = {"device": device, "dtype": dtype}
        self.alpha = nn.Parameter(torch.empty(1, **factory))
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(dim, **factory))
            self.bias = nn.Parameter(torch.empty(dim, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha_init)
        if self.weight is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def normalize(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        _check_last_dim("DyT", x, self.dim)
        y = torch.tanh(self.alpha * x.to(compute_dtype(x.dtype)))
        if self.weight is not None:
            y = y * self.weight + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, alpha_init={self.alpha_init}, elementwise_affine={self.weight is not None}"


@register_norm("none")
class NoNorm(ResidualNorm, nn.Module):
    """y = x: no normalization (norm-free baselines; with placement "none")."""

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        dim = check_size("NoNorm", "dim", dim)
        self.dim = dim

    def normalize(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        _check_last_dim("NoNorm", x, self.dim)  # as every norm: a wrong width is a bug upstream
        return x

    def extra_repr(self) -> str:
        return f"{self.dim}"


def _synced(norm: nn.Module) -> tuple[bool, object]:
    """Whether ``norm`` reduces its batch statistics over the ranks of a process group
    (``sync_batch_statistics``), and that group (None: the default group). Off outside
    torch.distributed, and over a group of one rank: the local statistics are the same."""
    if not getattr(norm, "sync_statistics", False):
        return False, None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False, None
    group = getattr(norm, "process_group", None)
    return dist.get_world_size(group) > 1, group


def _counts(valid: Tensor, group: object) -> tuple[int, int]:
    """(real positions, positions) over every rank of ``group``: one collective, read on
    the host (every rank needs them alike: to tell a batch with too few real positions,
    and one empty on every rank, which counts no statistics)."""
    import torch.distributed as dist

    n = torch.stack([valid.sum(dtype=torch.float64), torch.tensor(valid.numel(), dtype=torch.float64,
                                                                  device=valid.device)])
    dist.all_reduce(n, group=group)
    real, rows = n.tolist()
    return int(real), int(rows)


class _AllReduceSum(torch.autograd.Function):
    """The sum of ``x`` over the ranks of ``group``, differentiable: the gradient of each
    rank's loss reaches every rank's input (backward: the sum of the ranks' gradients),
    as in torch.nn.SyncBatchNorm."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, group=ctx.group)
        return g, None


def _global_moments(xf: Tensor, valid: Tensor, group: object) -> tuple[Tensor, Tensor, int, int]:
    """The mean and biased variance of ``xf``'s real positions over every rank of
    ``group``, per channel, differentiable across the ranks (``_AllReduceSum``), with the
    global counts of real positions and of positions (``_counts``). Two passes, as a
    single process computes them (no sum-of-squares cancellation)."""
    n, rows = _counts(valid, group)
    if n < 2:
        return xf.new_zeros(()), xf.new_zeros(()), n, rows
    dims = tuple(range(xf.dim() - 1))
    mean = _AllReduceSum.apply(xf.sum(dims), group) / n
    var = _AllReduceSum.apply((((xf - mean) * valid).square()).sum(dims), group) / n
    return mean, var, n, rows


_EAGER: dict = {}


def _eager(fn, reason: str = "synced batch statistics run eager collectives"):
    """``fn`` under ``torch.compiler.disable`` (outside any compiled graph: a graph break
    under torch.compile, refused under fullgraph=True, with ``reason``); made on first use
    (disabling imports torch._dynamo, which a plain ``import normlab`` does not pay for)."""
    if fn not in _EAGER:
        _EAGER[fn] = torch.compiler.disable(fn, reason=reason)
    return _EAGER[fn]


def sync_batch_statistics(model: nn.Module, process_group: object = None) -> nn.Module:
    """Makes every norm in ``model`` that computes batch statistics (``MaskedBatchNorm``,
    ``PowerNorm``) compute them over the whole batch of every rank of ``process_group``
    (default: torch.distributed's default group) when training, as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does for torch's BatchNorm (it
    leaves normlab's norms alone). Under DistributedDataParallel each rank otherwise
    normalizes by its own slice's statistics, so the model computes something else than
    on one process. Returns ``model``, changed in place.

    Every rank must then call each such norm in training mode the same number of times,
    in the same order (each call is a collective; an empty slice on one rank takes part).
    A ``process_group`` other than the default is held by each norm, which then neither
    pickles nor deep-copies (as torch.nn.SyncBatchNorm's); ``state_dict`` is unchanged.
    Outside torch.distributed, or over a group of one rank, the norms compute as before.
    Eval mode uses the running statistics, which the synced steps keep equal on every
    rank. Under torch.compile the collectives break the graph (fullgraph=True refuses
    them)."""
    if not isinstance(model, nn.Module):
        raise NormArgumentError(f"sync_batch_statistics: expected model to be a torch.nn.Module, "
                                f"got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, (MaskedBatchNorm, PowerNorm)):
            module.sync_statistics = True
            if process_group is None:
                module.__dict__.pop("process_group", None)
            else:
                module.process_group = process_group
    return model


_MBN_TOO_FEW = "MaskedBatchNorm: expected more than 1 real (unpadded) position per channel when training"


@register_norm("batchnorm")
class MaskedBatchNorm(ResidualNorm, nn.Module):
    """y = (x - mu_B) / sqrt(var_B + eps) * gamma + beta, statistics over the real (unpadded) positions of the batch (Ioffe & Szegedy 2015, masked for sequences)."""

    uses_batch_statistics = True
    sync_statistics = False  # ``sync_batch_statistics``: over every rank's batch
    process_group = None

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        dim = check_size("MaskedBatchNorm", "dim", dim)
        eps = _check_number("MaskedBatchNorm", "eps", eps, 0.0, low_open=True)
        if momentum is not None:  # None: a cumulative average over the batches (as torch's BatchNorm)
            momentum = _check_number("MaskedBatchNorm", "momentum", momentum, 0.0, 1.0)
        self.dim, self.eps, self.momentum = dim, eps, momentum
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(dim, **factory))
            self.bias = nn.Parameter(torch.empty(dim, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        stat = {"device": device, "dtype": torch.float32 if dtype is None else dtype}
        self.register_buffer("running_mean", torch.zeros(dim, **stat))
        self.register_buffer("running_var", torch.ones(dim, **stat))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def normalize(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        _check_last_dim("MaskedBatchNorm", x, self.dim)
        valid = _valid_positions("MaskedBatchNorm", x, padding_mask)
        # padded values (even inf or nan) reach neither the statistics nor, through them,
        # the gradient: they are zeros from here on
        xf = torch.where(valid.bool(), x.to(valid.dtype), 0.0) if padding_mask is not None else x.to(valid.dtype)
        synced, group = _synced(self) if self.training else (False, None)
        if synced:  # over every rank's real positions (an empty slice takes part)
            mean, var, n, rows = _eager(_global_moments)(xf, valid, group)
            if n < 2 and rows:  # (every rank empty: an empty batch, below)
                raise NormArgumentError(f"{_MBN_TOO_FEW}, got {n} over all ranks")
        if self.training and (rows == 0 if synced else x.numel() == 0):
            # an empty batch, as torch's BatchNorm takes it: counted, the running statistics
            # kept, an empty output still joined to gamma and beta's graph
            with torch.no_grad():
                self.num_batches_tracked += 1
            y = xf if self.weight is None else xf * self.weight + self.bias
            return y.to(x.dtype)
        if self.training:
            if not synced:
                # every position real: the count is the shape's (no host sync); else the mask's
                n = x.numel() // x.shape[-1] if padding_mask is None else valid.sum()
                if torch.compiler.is_compiling():
                    # asserted when the graph runs, on a tensor (a check of a dynamic shape itself
                    # is dropped: traced sizes are taken to be >= 2)
                    torch._check_tensor_all(valid.sum() >= 2, lambda: _MBN_TOO_FEW)
                elif (count := n if padding_mask is None else int(n.item())) < 2:
                    raise NormArgumentError(f"{_MBN_TOO_FEW}, got {count}")
                dims = tuple(range(x.dim() - 1))
                mean = xf.sum(dims) / n
                var = (((xf - mean) * valid).square()).sum(dims) / n
            with torch.no_grad():
                self.num_batches_tracked += 1
                # (momentum=None, the cumulative average: a weight on the device, not read back)
                weight = (1.0 / self.num_batches_tracked).to(self.running_mean.dtype) if self.momentum is None \
                    else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), weight)
                unbiased = var * n / (n - 1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), weight)
        else:
            mean, var = self.running_mean.to(xf.dtype), self.running_var.to(xf.dtype)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight + self.bias
        if padding_mask is not None:
            # a padded position's output is 0: what reaches it (a custom loss's gradient,
            # even nan) reaches neither the batch statistics, so neither the real
            # positions' gradients, nor gamma and beta
            y = torch.where(valid.bool(), y, 0.0)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, momentum={self.momentum}, affine={self.weight is not None}"


_POWERNORM_NO_SECOND = (
    "PowerNorm: no second derivative: its backward is Shen et al.'s approximation (a running estimate "
    "in place of the batch statistic's term), which has no derivative of its own; differentiate through "
    "another norm, or keep PowerNorm out of the second derivative's graph")


class _PowerNormScale(torch.autograd.Function):
    """x_hat = x / psi with PowerNorm's approximate backward (Shen et al. 2020, Algorithm 2,
    as the paper prints it; the authors' released code has the same nu update, for
    nu / (1 - alpha_bkw), but divides by the batch's psi after warm-up too):

        dL/dx = (g - nu * x_hat) / psi,   g = dL/dx_hat,
        nu <- nu * (1 - (1 - alpha_bkw) * Gamma_B) + (1 - alpha_bkw) * Lambda_B,
        Lambda_B = mean_B(g * x_hat),   Gamma_B = mean_B(x_hat^2)

    (means over the real positions). nu is the running estimate of the term that exact
    backpropagation through the batch statistic would subtract; it is updated in place
    during backward. Padded positions have x = 0, so x_hat = 0 there: they get no
    gradient and no say in nu. The approximation has no derivative of its own: a second
    derivative through it (create_graph=True, as a gradient penalty takes) raises.

    nu is in the units of g: a loss scale is in it (a changed scale washes out in about
    1 / ((1 - alpha_bkw) * Gamma) steps), and a g that is not finite (a loss scaler's
    overflow step, skipped) leaves nu as it was."""

    @staticmethod
    def forward(ctx, x, psi, grad_ema, valid, alpha_bkw, masked, synced, group):
        x_hat = x / psi
        ctx.save_for_backward(x_hat, psi, valid)
        ctx.masked = masked  # a padding mask was given
        ctx.synced, ctx.group = synced, group  # over every rank of the process group (``_synced``)
        ctx.grad_ema, ctx.alpha_bkw = grad_ema, alpha_bkw  # a buffer, read at backward time
        return x_hat

    @staticmethod
    def backward(ctx, g):
        x_hat, psi, valid = ctx.saved_tensors
        grad_ema = ctx.grad_ema
        if ctx.masked:  # what reaches a padded output (even nan) never reaches x or nu
            g = torch.where(valid.bool(), g, 0.0)
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            dx = (g - grad_ema * x_hat) / psi
        if create_graph:  # dx was computed without a graph: its derivative refused
            (dx,) = refuse_second_derivative((dx,), (g, x_hat, psi), _POWERNORM_NO_SECOND)
        with torch.no_grad():
            d = x_hat.shape[-1]
            # (a 1-D input is one position)
            lam, gam, n = (g * x_hat).reshape(-1, d).sum(0), x_hat.square().reshape(-1, d).sum(0), valid.sum()
            if ctx.synced:  # over every rank's real positions, as the forward's (one collective)
                import torch.distributed as dist

                sums = torch.cat([lam, gam, n.reshape(1)])
                dist.all_reduce(sums, group=ctx.group)
                lam, gam, n = sums[:d], sums[d:2 * d], sums[-1]
            n = n.clamp_min(1)
            lam, gam = lam / n, gam / n
            new = grad_ema * (1 - (1 - ctx.alpha_bkw) * gam) + (1 - ctx.alpha_bkw) * lam
            # a gradient that is not finite (a loss scaler's overflow step, which it skips)
            # leaves nu as it was: kept, it would make every later gradient non-finite
            grad_ema.copy_(torch.where(torch.isfinite(lam).all(), new, grad_ema))
        return dx, None, None, None, None, None, None, None


_POWERNORM_RECOMPUTED = (
    "PowerNorm: a training-mode forward cannot run inside a backward pass. Activation checkpointing "
    "(torch.utils.checkpoint) recomputes the forward there, which would count the step and update the "
    "running statistics a second time, and divide by another psi than the forward did (wrong gradients); "
    "keep PowerNorm out of the checkpointed region (in eval mode, on running statistics, it may be "
    "recomputed). Any other training-mode call from a backward hook is refused alike: run it after the "
    "backward")


def _powernorm_statistics(norm: PowerNorm, xf: Tensor, valid: Tensor, masked: bool, synced: bool,
                          group: object, real: int) -> Tensor:
    """One training step's statistics: counts the step, updates ``running_phi`` and
    returns the phi this step divides by (the batch's during warm-up, else the running
    one of the previous step). Outside any compiled graph (``_eager``): traced,
    the in-place buffer updates and the value read before them were not kept apart, so
    the backward divided by the updated psi. The warm-up switch is taken on the device
    (no host sync per step); only a padding mask's count of real positions is read.
    ``synced``: over every rank of the process group ``group`` (``_synced``), whose real
    positions (``real``, counted by ``_counts``) every rank takes."""
    if torch._C._current_graph_task_id() != -1:
        raise RuntimeError(_POWERNORM_RECOMPUTED)
    with torch.no_grad():
        if synced:  # over every rank's real positions (an empty slice takes part)
            import torch.distributed as dist

            n = real
            if n < 1:
                raise NormArgumentError("PowerNorm: expected at least one real (unpadded) position over all "
                                        "ranks when training")
            sq = xf.reshape(-1, norm.dim).square().sum(0)
            dist.all_reduce(sq, group=group)
            batch_phi = sq / n
        else:
            if masked:
                n = valid.sum()
                if n.item() < 1:
                    raise NormArgumentError("PowerNorm: expected at least one real (unpadded) position when training")
            else:
                n = xf.numel() // norm.dim  # (a 1-D input is one position)
            batch_phi = xf.reshape(-1, norm.dim).square().sum(0) / n
        norm.iters += 1
        t = norm.iters
        warm = t <= norm.warmup_iters
        phi = torch.where(warm, batch_phi, norm.running_phi)  # (a copy: the buffer changes below)
        t64 = t.to(torch.float64)
        running = norm.running_phi
        mean_so_far = running * ((t64 - 1) / t64) + batch_phi / t
        ema = running * norm.alpha_fwd + (1 - norm.alpha_fwd) * batch_phi
        running.copy_(torch.where(warm, mean_so_far, ema))
    return phi


_POWERNORM_STEP_REASON = ("PowerNorm's training-mode step updates its running statistics in place, outside the "
                          "graph: compile it with fullgraph=False, or compile the model in eval mode")


@register_norm("powernorm")
class PowerNorm(ResidualNorm, nn.Module):
    """y = gamma * x / psi + beta, psi^2 a running quadratic mean of x over batches, no mean subtraction, approximate backprop (Shen et al. 2020, "PowerNorm: Rethinking Batch Normalization in Transformers").

    Training step t: psi_B^2 = mean over real positions of x^2 (per channel);
    the forward divides by psi_{t-1} (by psi_B during the first ``warmup_iters`` steps);
    psi_t^2 = alpha_fwd * psi_{t-1}^2 + (1 - alpha_fwd) * psi_B^2 (a plain average of
    the batches seen during warm-up). Eval divides by the running psi. With a
    ``padding_mask`` padded outputs are 0 and take no part in any gradient, as in
    ``MaskedBatchNorm``.

    ``groups``: None (default), Algorithm 2 as the paper prints it; k, each position is
    first divided by its root mean square over each of k contiguous groups of channels
    (x_g / sqrt(mean(x_g^2) + eps), differentiated exactly), as the authors' code does
    before the power normalization (``GroupScaling1D``; their language-model and
    translation runs use k = the number of attention heads, described in the paper's
    appendix as stabilizing training).
    """

    uses_batch_statistics = True
    sync_statistics = False  # ``sync_batch_statistics``: over every rank's batch
    process_group = None
    groups: int | None = None  # (a PowerNorm pickled before groups existed has none)

    def __init__(self, dim: int, eps: float = 1e-5, alpha_fwd: float = 0.9, alpha_bkw: float = 0.9,
                 warmup_iters: int = 100, affine: bool = True, device=None, dtype=None, *,
                 groups: int | None = None) -> None:
        super().__init__()
        dim = check_size("PowerNorm", "dim", dim)
        if groups is not None:
            if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1 or dim % groups:
                raise NormArgumentError(f"PowerNorm: expected groups to be None or a positive int dividing "
                                        f"dim={dim}, got {groups!r}")
            groups = int(groups)
        self.groups = groups
        eps = _check_number("PowerNorm", "eps", eps, 0.0, low_open=True)
        alpha_fwd = _check_number("PowerNorm", "alpha_fwd", alpha_fwd, 0.0, 1.0)
        alpha_bkw = _check_number("PowerNorm", "alpha_bkw", alpha_bkw, 0.0, 1.0)
        if isinstance(warmup_iters, bool) or not isinstance(warmup_iters, numbers.Integral) or warmup_iters < 0:
            raise NormArgumentError(f"PowerNorm: expected warmup_iters to be an int >= 0, got {warmup_iters!r}")
        warmup_iters = int(warmup_iters)
        self.dim, self.eps, self.alpha_fwd, self.alpha_bkw = dim, eps, alpha_fwd, alpha_bkw
        self.warmup_iters = warmup_iters
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(dim, **factory))
            self.bias = nn.Parameter(torch.empty(dim, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        stat = {"device": device, "dtype": torch.float32 if dtype is None else dtype}  # as MaskedBatchNorm's
        self.register_buffer("running_phi", torch.ones(dim, **stat))
        self.register_buffer("grad_ema", torch.zeros(dim, **stat))
        self.register_buffer("iters", torch.zeros((), dtype=torch.long, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.running_phi.fill_(1.0)
        self.grad_ema.zero_()
        self.iters.zero_()
        if self.weight is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def normalize(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        _check_last_dim("PowerNorm", x, self.dim)
        valid = _valid_positions("PowerNorm", x, padding_mask)
        # padded values (even inf or nan) are zeros from here on: no statistics, no gradient
        xf = torch.where(valid.bool(), x.to(valid.dtype), 0.0) if padding_mask is not None else x.to(valid.dtype)
        if self.groups is not None:  # (a padded position stays 0)
            g = xf.unflatten(-1, (self.groups, self.dim // self.groups))
            xf = (g * torch.rsqrt(g.square().mean(-1, keepdim=True) + self.eps)).flatten(-2)
        synced, group = _synced(self) if self.training else (False, None)
        real, rows = _eager(_counts)(valid, group) if synced else (0, x.numel())
        if self.training and rows == 0:
            # an empty batch (on every rank, synced): no statistics, so no step counted (its
            # warm-up counts steps with statistics)
            y = xf
        elif self.training:  # (synced: an empty slice takes part in the collectives)
            step = _eager(_powernorm_statistics, _POWERNORM_STEP_REASON)
            phi = step(self, xf, valid, padding_mask is not None, synced, group, real)
            psi = torch.sqrt(phi.to(xf.dtype) + self.eps)
            y = _PowerNormScale.apply(xf, psi, self.grad_ema, valid, self.alpha_bkw, padding_mask is not None,
                                      synced, group)
        else:
            y = xf / torch.sqrt(self.running_phi.to(xf.dtype) + self.eps)
        if self.weight is not None:
            y = y * self.weight + self.bias
        if padding_mask is not None:
            y = torch.where(valid.bool(), y, 0.0)  # as MaskedBatchNorm's: nothing at a padded output reaches gamma, beta
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.dim}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, "
                f"warmup_iters={self.warmup_iters}, affine={self.weight is not None}"
                + (f", groups={self.groups}" if self.groups is not None else ""))
