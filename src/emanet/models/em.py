"""Expectation-Maximization attention: the functional core and the drop-in EMA unit.

Notation (paper and reference code): B batch, C channels, N = H*W pixels, K bases, T EM stages.

    E-step   z      = softmax_K(x_n . mu_k)                      (B, N, K)
             z_bar  = z / (eps + sum_n z)                         normalised over pixels
    M-step   mu     = x . z_bar                                   (B, C, K) weighted means
             mu     = mu / (eps + ||mu||_C)                       unit bases
    output   x_hat  = mu . z^T  with the LAST raw z               (B, C, N)

This module knows nothing of backbones, classes or losses.
"""

from __future__ import annotations

import contextlib
import math
import typing
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from emanet.fields import choices, one_of

BasesUpdate = Literal["ema", "none", "learned"]
Residual = Literal["conv", "gamma"]
Differentiable = bool | Literal["last"]  # False: no gradient (reference); True: all stages; "last": one step
DIFFERENTIABLE = (False, True, *choices(Differentiable))


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    # autocast rejects device types without an autocast dtype (e.g. "meta", used for FLOP counting)
    if device_type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _check_em_inputs(x: Tensor, bases: Tensor, num_stages: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if bases.dim() != 3 or bases.shape[1] != x.shape[1] or bases.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"bases must be (1 or B, C, K) = (1 or {x.shape[0]}, {x.shape[1]}, K), got {tuple(bases.shape)}"
        )
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")


def em_attention(
    x: Tensor, bases: Tensor, num_stages: int, eps: float = 1e-6, *, last_stage_grad: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``num_stages`` EM stages on ``x`` starting from ``bases``.

    Args:
        x: features (B, C, H, W).
        bases: initial bases (1 or B, C, K) with unit columns.
        num_stages: T >= 1.
        last_stage_grad: back-propagate through the last stage only (Hamburger's one-step gradient, Geng et
            al., ICLR 2021): stages 1..T-1 run without autograd and the last starts from their bases as a
            constant, so the backward costs one stage and does not chain through the unrolled iterations.
    Returns:
        reconstruction (B, C, H, W), final bases (B, C, K), responsibilities (B, K, H, W).
        The iterations run in float32 (float64 for float64 input), also under autocast: 512-d dot products
        feed a softmax that is nearly one-hot, so half precision flips assignments. Outputs come back in
        x's dtype, the reconstruction also in x's memory format (channels_last in, channels_last out).
    """
    _check_em_inputs(x, bases, num_stages)
    b, c, h, w = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 when given float64
    track_grad = torch.is_grad_enabled() and (x.requires_grad or bases.requires_grad)
    rows = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    with _no_autocast(x.device.type):
        feats_t = x.reshape(b, c, h * w).to(dtype).transpose(-1, -2)  # (B, N, C), a view of x in either format
        # The bases are kept transposed, (B, K, C): both products then read the features as (N, C) and
        # write small row-major outputs, which measured ~10% faster than the (C, K) orientation here.
        mu_t = bases.to(dtype).transpose(-1, -2)  # (1|B, K, C); matmul broadcasts a shared (1, K, C)
        # One image in eager mode: plain 2-D GEMMs, a few % faster than batched ones. Compiled or traced code
        # takes the batched path for every B, so a graph does not depend on (and recompile for) B == 1.
        two_d = b == 1 and not (torch.compiler.is_compiling() or torch.jit.is_tracing())
        if two_d:
            feats_t, mu_t = feats_t[0], mu_t[0]
        for stage in range(num_stages):
            grad_here = track_grad and (not last_stage_grad or stage == num_stages - 1)
            with torch.set_grad_enabled(grad_here):
                z = torch.softmax(feats_t @ mu_t.transpose(-1, -2), dim=-1)  # (B, N, K)  E-step
                # M-step. z_bar = z / (eps + sum_n z) then x . z_bar equals (x . z) / (eps + sum_n z):
                # dividing the small (K, C) product instead of the (N, K) responsibilities saves a full pass.
                mu_t = z.transpose(-1, -2) @ feats_t  # (B, K, C)
                if grad_here:
                    mu_t = mu_t / (eps + z.sum(dim=-2).unsqueeze(-1))
                    mu_t = mu_t / (eps + torch.linalg.vector_norm(mu_t, dim=-1, keepdim=True))
                else:  # in place: no allocations in the no-gradient stages
                    mu_t.div_(z.sum(dim=-2).add_(eps).unsqueeze(-1))
                    mu_t.div_(torch.linalg.vector_norm(mu_t, dim=-1, keepdim=True).add_(eps))
        # The reconstruction, with the last raw z (the reference's), in x's memory format: (B, N, C) rows for
        # channels_last input (prepared models), 1.7x faster a product here than the (B, C, N) NCHW one.
        recon = z @ mu_t if rows else mu_t.transpose(-1, -2) @ z.transpose(-1, -2)  # (B, N, C) or (B, C, N)
    if two_d:
        recon, mu_t, z = recon[None], mu_t[None], z[None]
    recon = recon.view(b, h, w, c).permute(0, 3, 1, 2) if rows else recon.view(b, c, h, w)
    recon = recon.to(x.dtype)
    resp = z.transpose(1, 2).unflatten(2, (h, w))  # (B, K, H, W), a view of z
    mu = mu_t.transpose(1, 2)  # (B, C, K)
    return recon, mu.to(x.dtype), resp.to(x.dtype)


def conv_init_(module: nn.Module) -> None:
    """The reference's init, for the EMA unit, the heads and the backbone alike: every conv in ``module``
    normal(0, sqrt(2 / (k*k*C_out))) (Kaiming fan-out) with a zero bias; norm layers weight 1, bias 0.
    Convs on the meta device (shape and FLOP counting) are skipped: they hold no values, and normal_ there
    imports the compiler (seconds)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and not m.weight.is_meta:
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm | nn.GroupNorm) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_bases(channels: int, num_bases: int) -> Tensor:
    """Reference init: normal(0, sqrt(2/K)), then unit columns. Shape (1, C, K)."""
    mu = torch.randn(1, channels, num_bases) * math.sqrt(2.0 / num_bases)
    return mu / (1e-6 + torch.linalg.vector_norm(mu, dim=1, keepdim=True))


def _check_unit_options(
    num_bases: int,
    num_stages: int,
    eval_stages: int | None,
    bases_update: str,
    momentum: float,
    differentiable: Differentiable,
    residual: str,
) -> None:
    """EMAUnit's argument checks: ValueErrors naming the argument (ModelConfig words them as config keys)."""
    if num_bases < 1:
        raise ValueError(f"num_bases must be >= 1, got {num_bases}")
    if num_stages < 1 or (eval_stages is not None and eval_stages < 1):
        raise ValueError(f"num_stages and eval_stages must be >= 1, got {num_stages}, {eval_stages}")
    if bases_update not in typing.get_args(BasesUpdate):
        raise ValueError(f"bases_update must be {one_of(typing.get_args(BasesUpdate))}, got {bases_update!r}")
    if differentiable not in DIFFERENTIABLE:
        raise ValueError(f"differentiable must be {one_of(DIFFERENTIABLE)}, got {differentiable!r}")
    if differentiable == "last" and bases_update == "learned":
        raise ValueError(
            "differentiable='last' cuts the gradient before the last stage, so learned bases "
            "would never get one; use bases_update='ema' or 'none', or differentiable=true"
        )
    if residual not in typing.get_args(Residual):
        raise ValueError(f"residual must be {one_of(typing.get_args(Residual))}, got {residual!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")


class EMAUnit(nn.Module):
    """The EMA unit: a drop-in residual block ``(B, C, H, W) -> (B, C, H, W)``.

    Default = the reference: conv_in (1x1, bias) -> EM without gradient -> ReLU -> conv_out (1x1) + BN
    -> + identity (the unit's input) -> ReLU, bases kept by a moving average over the global batch.

    Args:
        channels: C.
        num_bases: K in the paper.
        num_stages: T used in training.
        eval_stages: T used in eval mode (the paper evaluates T_eval != T_train); None = num_stages.
        bases_update: "ema" (moving average of the batch's final bases, paper Eq. 15), "none" (fixed
            bases) or "learned" (bases are a Parameter trained by back-propagation, the paper's ablation).
        momentum: weight of the NEW estimate in the moving average: mu0 <- (1-m) mu0 + m mean_batch(mu),
            the PyTorch-BN / mmsegmentation convention; the reference's 0.9/0.1 blend is m = 0.1.
        renormalize: L2-normalise the batch estimate before blending (mmsegmentation); the reference does not.
        differentiable: let gradients flow through the unrolled EM stages into conv_in (True), or through
            the last stage only ("last": Hamburger's one-step gradient, against the instability of
            back-propagating through every unrolled stage). The reference cuts them (False: EM under
            no_grad), so conv_in never learns: here it is then frozen (requires_grad=False) so optimizers
            and DDP never see a parameter that cannot get a gradient.
        residual: "conv" (the paper) or "gamma": Y = X + gamma * X_hat with a learnable gamma starting at 0.
        store_attention: keep the last responsibilities (B, K, H, W) and bases (B, C, K), detached, in
            ``last_responsibilities`` / ``last_bases`` for visualisation. The output is unchanged.
    """

    def __init__(
        self,
        channels: int,
        num_bases: int = 64,
        num_stages: int = 3,
        *,
        eval_stages: int | None = None,
        bases_update: BasesUpdate = "ema",
        momentum: float = 0.1,
        renormalize: bool = False,
        differentiable: Differentiable = False,
        residual: Residual = "conv",
        norm_layer: type[nn.Module] | None = None,
        eps: float = 1e-6,
        store_attention: bool = False,
    ) -> None:
        super().__init__()
        _check_unit_options(num_bases, num_stages, eval_stages, bases_update, momentum, differentiable, residual)
        self.channels, self.num_bases = channels, num_bases
        self.num_stages = num_stages
        self.eval_stages = eval_stages
        self.bases_update = bases_update
        self.momentum = momentum
        self.renormalize = renormalize
        self.differentiable = differentiable
        self.residual = residual
        self.eps = eps
        self.store_attention = store_attention
        # When True, training forwards only accumulate batch estimates; apply_bases_update() blends them
        # (gradient accumulation: the moving average then sees the accumulated batch).
        self.defer_bases_update = False
        self.last_responsibilities: Tensor | None = None
        self.last_bases: Tensor | None = None

        mu = init_bases(channels, num_bases)
        if bases_update == "learned":
            self.bases = nn.Parameter(mu)
        else:
            self.register_buffer("bases", mu)
        self.register_buffer("_acc_sum", torch.zeros(channels, num_bases), persistent=False)
        self.register_buffer("_acc_count", torch.zeros(()), persistent=False)

        self.conv_in = nn.Conv2d(channels, channels, 1, bias=True)
        conv_init_(self.conv_in)
        if not differentiable:
            self.conv_in.requires_grad_(False)
        if residual == "conv":
            norm_layer = norm_layer or nn.BatchNorm2d
            self.conv_out = nn.Conv2d(channels, channels, 1, bias=False)
            conv_init_(self.conv_out)
            self.bn_out = norm_layer(channels)
            nn.init.ones_(self.bn_out.weight)
            nn.init.zeros_(self.bn_out.bias)
        else:
            self.gamma = nn.Parameter(torch.zeros(1))

    @property
    def stages(self) -> int:
        """The number of EM stages the next forward runs."""
        if not self.training and self.eval_stages is not None:
            return self.eval_stages
        return self.num_stages

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_bases={self.num_bases}, num_stages={self.num_stages}, "
            f"eval_stages={self.eval_stages}, bases_update={self.bases_update!r}, momentum={self.momentum}, "
            f"differentiable={self.differentiable}, residual={self.residual!r}"
        )

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        # conv_in feeds the E-step's unscaled dot products: it runs in float32 too under autocast
        with _no_autocast(x.device.type):
            feats = self.conv_in(x.to(torch.promote_types(x.dtype, torch.float32)))
        if self.bases_update == "learned":
            bases = self.bases / (self.eps + torch.linalg.vector_norm(self.bases, dim=1, keepdim=True))
            # Bases learn by back-propagation; conv_in learns only in differentiable mode.
            inp = feats if self.differentiable else feats.detach()
            recon, mu, resp = em_attention(inp, bases, self.stages, self.eps)
        elif self.differentiable:
            # clone: autograd keeps the initial bases for the backward, and the moving average below
            # updates the buffer in place
            recon, mu, resp = em_attention(
                feats, self.bases.clone(), self.stages, self.eps, last_stage_grad=self.differentiable == "last"
            )
        else:
            with torch.no_grad():
                recon, mu, resp = em_attention(feats, self.bases, self.stages, self.eps)

        if self.training and self.bases_update == "ema":
            self._accumulate(mu)
            if not self.defer_bases_update:
                self.apply_bases_update()
        if self.store_attention:
            self.last_responsibilities, self.last_bases = resp.detach(), mu.detach()

        if self.residual == "conv":
            out = self.bn_out(self.conv_out(torch.relu(recon)))
            return torch.relu(out + identity)
        return identity + self.gamma * recon

    @torch.no_grad()
    def _accumulate(self, mu: Tensor) -> None:
        self._acc_sum += mu.detach().float().sum(dim=0)  # (C, K)
        self._acc_count += mu.shape[0]

    @torch.no_grad()
    def apply_bases_update(self) -> None:
        """Blend the accumulated batch estimate into the stored bases (no-op when nothing accumulated).

        Under torch.distributed the sums and counts are all-reduced first, so the estimate is the mean over
        the GLOBAL batch and every rank stores identical bases (DDP's buffer broadcast would otherwise copy
        rank 0's local estimate everywhere).
        """
        if self.bases_update != "ema":
            return
        packed = torch.cat([self._acc_sum.flatten(), self._acc_count.view(1)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed)
        # No host sync (no `if count == 0` on the CPU side): a step that accumulated nothing blends with
        # weight 0, which leaves the bases bit-for-bit unchanged; the clamp keeps 0 / 0 out of the estimate.
        count = packed[-1]
        batch_mu = (packed[:-1] / count.clamp(min=1)).view(1, self.channels, self.num_bases)
        if self.renormalize:
            batch_mu = batch_mu / (self.eps + torch.linalg.vector_norm(batch_mu, dim=1, keepdim=True))
        weight = (count > 0).to(self.bases.dtype) * self.momentum  # 0-d tensor: momentum, or 0 when empty
        self.bases.mul_(1.0 - weight).add_(batch_mu.to(self.bases.dtype) * weight)
        self.discard_pending_update()

    @torch.no_grad()
    def discard_pending_update(self) -> None:
        """Drop the batch estimates accumulated since the last update: the stored bases never see them (a
        training step skipped for a non-finite loss)."""
        self._acc_sum.zero_()
        self._acc_count.zero_()


def ema_units(model: nn.Module) -> list[EMAUnit]:
    """Every EMAUnit in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, EMAUnit)]


def set_eval_stages(model: nn.Module, stages: int | None) -> None:
    """Set T_eval on every EMA unit of ``model`` (None: evaluate with the training T)."""
    for unit in ema_units(model):
        if stages is not None and stages < 1:
            raise ValueError(f"eval stages must be >= 1, got {stages}")
        unit.eval_stages = stages
