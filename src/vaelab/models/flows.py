"""Normalising-flow posteriors: q(z|x) is the encoder's diagonal Gaussian pushed through K
invertible steps, z_K = f_K o ... o f_1(z_0), z_0 ~ N(mu(x), diag sigma^2(x)), with

    log q(z_K|x) = log N(z_0; mu, sigma) - sum_k log |det df_k/dz_{k-1}|.

- Planar flows (Rezende & Mohamed 2015): f(z) = z + u' tanh(w.z + b), u' the paper's
  reparameterised u with w.u' >= -1 (f invertible); u, w, b are amortised (the encoder outputs
  them for each example, as in the paper and the Sylvester-flows code).
- Inverse autoregressive flow (Kingma et al. 2016): [m, s] = MADE(z, h(x)), sigma = sigmoid(s +
  forget_bias), f(z) = sigma * z + (1 - sigma) * m, log det = sum log sigma; the variables'
  order is reversed between steps; h(x) is a context vector the encoder outputs.

`FlowPosterior` is a torch Distribution: `rsample` returns z_K and keeps log q(z_K|x) from the
pass that drew it, so the objectives' `q.log_prob(z)` on their own draws costs nothing more;
`log_prob` of any other point inverts the flow exactly (IAF: D sequential passes of each step's
network; planar: a 1-D monotone root per step, bisection then one Newton step that carries the
gradient). So ELBO, IWAE, DReG (whose stopped posterior is `detached()`) and the k=5000
evaluation use it unchanged. Its `mean` is the flow's image of the base mean (the code pictures
and diagnostics use); E_q[z] itself has no closed form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, constraints

from vaelab.errors import require_int, require_number
from vaelab.models.base import stopped


class FlowPosterior(Distribution):
    """The base Gaussian (batch (B,), event (D,)) through `flow` given per-example `context`
    (B, E); `detach`: the flow's parameters cut from the graph (DReG's stopped posterior).

    It keeps the last draw and its log q, computed in the pass that drew it (each step gives its
    log-determinant with its output): the semantics of torch's `Transform(cache_size=1)`, for the
    whole flow, on this object only. torch's own `TransformedDistribution` would recompute every
    step's log-determinant from the cached inputs in `log_prob` (a second pass of each MADE per
    training step)."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self, base: Distribution, flow: PosteriorFlow, context: Tensor, detach: bool = False
    ) -> None:
        self.base, self.flow, self.context, self.detach = base, flow, context, detach
        self._drawn: tuple[Tensor, Tensor] | None = None  # (z, log q(z)) of the last draw
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        z0 = self.base.rsample(sample_shape)
        z, log_det = self.flow.push(z0, self.context, self.detach)
        self._drawn = (z, self.base.log_prob(z0) - log_det)
        return z

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        """log q(z|x), (*S, B): the draw's own value for the tensor `rsample` last returned,
        else by inverting the flow."""
        if self._drawn is not None and value is self._drawn[0]:
            return self._drawn[1]
        z0, log_det = self.flow.pull(value, self.context, self.detach)
        log_q = self.base.log_prob(z0) - log_det
        # far out in the tails the inverse can overflow (IAF: z = (y - (1 - sigma) m) / sigma
        # with sigma underflowing): there z_0 is beyond float range, the density 0
        return torch.where(torch.isfinite(z0).all(-1), log_q, -math.inf)

    @property
    def mean(self) -> Tensor:
        """The flow's image of the base mean (B, D): the posterior's code for pictures and
        diagnostics (not E_q[z], which has no closed form)."""
        return self.flow.push(self.base.mean, self.context, self.detach)[0]

    def detached(self) -> FlowPosterior:
        """The same q with every parameter (base, context, flow weights) cut from the graph:
        log q(z) still depends on z (DReG's path derivative)."""
        return FlowPosterior(stopped(self.base), self.flow, self.context.detach(), detach=True)


class PosteriorFlow(nn.Module):
    """K steps on a `latent_dim` code; the encoder emits `context_dim` numbers per example
    besides the base Gaussian's mean and log-variance. Steps implement `forward(z, context,
    detach) -> (z', log|det|)` and `inverse(z', context, detach) -> z`, with codes (..., D) and a
    context broadcastable to them."""

    context_dim = 0

    def __init__(self, latent_dim: int, steps: int) -> None:
        super().__init__()
        require_int("posterior.steps", steps, 1)
        self.layers = nn.ModuleList()

    def forward(self, base: Distribution, context: Tensor) -> FlowPosterior:
        return FlowPosterior(base, self, context)

    def step_context(self, context: Tensor, index: int) -> Tensor:
        """Step `index`'s share of the context (B, E)."""
        return context

    def push(self, z: Tensor, context: Tensor, detach: bool = False) -> tuple[Tensor, Tensor]:
        """z_0 (*S, B, D) -> (z_K, sum_k log |det df_k|) with log-det (*S, B)."""
        log_det = z.new_zeros(z.shape[:-1])
        for i, layer in enumerate(self.layers):
            z, step_log_det = layer(z, self.step_context(context, i), detach)
            log_det = log_det + step_log_det
        return z, log_det

    def pull(self, z: Tensor, context: Tensor, detach: bool = False) -> tuple[Tensor, Tensor]:
        """z_K (*S, B, D) -> (z_0, the forward log-det at z_0), by exact inversion."""
        codes = [z]
        for i in reversed(range(len(self.layers))):
            codes.append(self.layers[i].inverse(codes[-1], self.step_context(context, i), detach))
        z0 = codes[-1]
        log_det = z.new_zeros(z.shape[:-1])
        for i, layer in enumerate(self.layers):
            log_det = log_det + layer(codes[-1 - i], self.step_context(context, i), detach)[1]
        return z0, log_det


class PlanarStep(nn.Module):
    """f(z) = z + u' tanh(w.z + b) with (u, w, b) per example from the context (..., 2D + 1)."""

    #: bisection steps of the inverse (the bracket has width 2|w.u'|; float64 reaches its end)
    BISECTIONS = 80

    @staticmethod
    def parameters_of(z: Tensor, context: Tensor, detach: bool) -> tuple[Tensor, Tensor, Tensor]:
        context = context.detach() if detach else context
        d = z.shape[-1]
        u, w, b = context[..., :d], context[..., d : 2 * d], context[..., 2 * d :]
        wu = (w * u).sum(-1, keepdim=True)
        # u' = u + (m(w.u) - w.u) w / |w|^2 with m(a) = -1 + softplus(a): w.u' > -1
        u_hat = u + (F.softplus(wu) - 1 - wu) * w / (w * w).sum(-1, keepdim=True).clamp_min(1e-12)
        return u_hat, w, b

    def forward(self, z: Tensor, context: Tensor, detach: bool = False) -> tuple[Tensor, Tensor]:
        u, w, b = self.parameters_of(z, context, detach)
        h = torch.tanh((w * z).sum(-1, keepdim=True) + b)
        # det (I + u' psi^T) = 1 + psi.u', psi = (1 - h^2) w: 1 + (1 - h^2) w.u' > 0
        log_det = torch.log1p((1 - h * h).squeeze(-1) * (w * u).sum(-1))
        return z + u * h, log_det

    def inverse(self, y: Tensor, context: Tensor, detach: bool = False) -> Tensor:
        """The z with f(z) = y: a = w.z solves a + c tanh(a + b) = w.y (c = w.u' > -1, so the
        left side increases with a) in [w.y - |c|, w.y + |c|]; then z = y - u' tanh(a + b)."""
        u, w, b = self.parameters_of(y, context, detach)
        c, target = (w * u).sum(-1, keepdim=True), (w * y).sum(-1, keepdim=True)
        with torch.no_grad():
            c64, t64, b64 = c.double(), target.double(), b.double()
            c64, t64, b64 = torch.broadcast_tensors(c64, t64, b64)
            low, high = t64 - c64.abs(), t64 + c64.abs()
            for _ in range(self.BISECTIONS):
                mid = 0.5 * (low + high)
                above = mid + c64 * torch.tanh(mid + b64) > t64
                high, low = torch.where(above, mid, high), torch.where(above, low, mid)
            a0 = (0.5 * (low + high)).to(y.dtype)
        # one Newton step from the root: the same value, and the root's gradient in y, u, w, b
        t = torch.tanh(a0 + b)
        a = a0 - (a0 + c * t - target) / (1 + c * (1 - t * t)).detach()
        return y - u * torch.tanh(a + b)


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (out, in)."""

    def __init__(self, mask: Tensor, zero: bool = False) -> None:
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.float(), persistent=False)
        if zero:
            nn.init.zeros_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, detach: bool = False) -> Tensor:
        weight, bias = self.weight, self.bias
        if detach:
            weight, bias = weight.detach(), bias.detach()
        return F.linear(x, weight * self.mask, bias)


class IAFStep(nn.Module):
    """z' = sigma * z + (1 - sigma) * m, [m, s] = MADE(z, h), sigma = sigmoid(s + forget_bias):
    output d sees the inputs before it in `order` (a permutation of 1..D) and all of h."""

    def __init__(
        self, latent_dim: int, context_dim: int, hidden_dim: int, order: Tensor, forget_bias: float
    ) -> None:
        super().__init__()
        d = latent_dim
        self.forget_bias = forget_bias
        degree_in = torch.cat([order, torch.zeros(context_dim, dtype=torch.long)])  # (D + E,)
        degree_hidden = torch.arange(hidden_dim) % d  # 0 .. D-1; degree 0 sees h alone
        degree_out = torch.cat([order, order])  # m and s
        self.layers = nn.ModuleList(
            [
                MaskedLinear(degree_hidden[:, None] >= degree_in[None, :]),
                MaskedLinear(degree_hidden[:, None] >= degree_hidden[None, :]),
                # zero at the start: m = 0, sigma = sigmoid(forget_bias), a contraction
                MaskedLinear(degree_out[:, None] > degree_hidden[None, :], zero=True),
            ]
        )
        self.register_buffer("order", order, persistent=False)

    def shift_and_gate(self, z: Tensor, context: Tensor, detach: bool) -> tuple[Tensor, Tensor]:
        context = context.detach() if detach else context
        batch = torch.broadcast_shapes(z.shape[:-1], context.shape[:-1])
        h = torch.cat(
            [z.expand(*batch, z.shape[-1]), context.expand(*batch, context.shape[-1])], dim=-1
        )
        for layer in self.layers[:-1]:
            h = F.elu(layer(h, detach))
        m, s = self.layers[-1](h, detach).chunk(2, dim=-1)
        return m, s + self.forget_bias

    def forward(self, z: Tensor, context: Tensor, detach: bool = False) -> tuple[Tensor, Tensor]:
        m, s = self.shift_and_gate(z, context, detach)
        sigma = torch.sigmoid(s)
        return sigma * z + (1 - sigma) * m, F.logsigmoid(s).sum(-1)

    def inverse(self, y: Tensor, context: Tensor, detach: bool = False) -> Tensor:
        """D passes: after pass t the dimensions of order <= t are exact (each depends only on
        those before it), so after D passes all are."""
        z = torch.zeros_like(y)
        for _ in range(y.shape[-1]):
            m, s = self.shift_and_gate(z, context, detach)
            sigma = torch.sigmoid(s)
            z = (y - (1 - sigma) * m) / sigma
        return z


class PlanarFlow(PosteriorFlow):
    """`steps` planar flows with amortised parameters (Rezende & Mohamed 2015)."""

    def __init__(self, latent_dim: int, steps: int = 4) -> None:
        super().__init__(latent_dim, steps)
        self.per_step = 2 * latent_dim + 1
        self.context_dim = steps * self.per_step
        self.layers.extend(PlanarStep() for _ in range(steps))

    def step_context(self, context: Tensor, index: int) -> Tensor:
        return context[..., index * self.per_step : (index + 1) * self.per_step]


class IAF(PosteriorFlow):
    """`steps` IAF steps (Kingma et al. 2016), each a two-hidden-layer MADE of `hidden_dim`
    units (ELU) given a context h(x) of `context_dim` numbers; the order reverses each step."""

    def __init__(
        self,
        latent_dim: int,
        steps: int = 4,
        hidden_dim: int = 128,
        context_dim: int = 32,
        forget_bias: float = 3.0,
    ) -> None:
        super().__init__(latent_dim, steps)
        require_int("posterior.hidden_dim", hidden_dim, 1)
        require_int("posterior.context_dim", context_dim, 0)
        require_number("posterior.forget_bias", forget_bias, -math.inf)
        self.context_dim = context_dim
        forward_order = torch.arange(1, latent_dim + 1)
        for i in range(steps):
            order = forward_order if i % 2 == 0 else forward_order.flip(0)
            self.layers.append(IAFStep(latent_dim, context_dim, hidden_dim, order, forget_bias))
