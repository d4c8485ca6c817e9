"""Objectives of autoencoders whose codes are not a Gaussian draw: the deterministic
autoencoder baseline, the regularised autoencoder (RAE) and the VQ-VAE's."""

from __future__ import annotations

import torch
from torch import Tensor

from vaelab.errors import require, require_number
from vaelab.models import LatentVariableModel
from vaelab.objectives.base import Objective, bound_parts


class Autoencoder(Objective):
    """The deterministic autoencoder baseline: the posterior mean is the code, no sampling, no
    KL. loss = -log p(x|z) (`reconstruction: likelihood`) or the squared error of p(x|z)'s mean
    summed over pixels (`reconstruction: mse`). There is no ELBO and no likelihood estimate: its
    latent space is not fitted to a prior, which is why decoding z ~ p(z) gives poor samples.
    """

    RECONSTRUCTIONS = ("likelihood", "mse")
    probabilistic = False

    def __init__(self, reconstruction: str = "likelihood") -> None:
        require(
            reconstruction in self.RECONSTRUCTIONS,
            f"objective.reconstruction must be one of {', '.join(self.RECONSTRUCTIONS)}, "
            f"got {reconstruction!r}",
        )
        self.reconstruction = reconstruction

    def parts(
        self, model: LatentVariableModel, x: Tensor, target: Tensor, step: int | None
    ) -> dict[str, Tensor]:
        p = model.decode(model.posterior(x).mean)
        distortion = -p.log_prob(target)  # (B,)
        squared_error = (p.mean - target).pow(2).flatten(1).sum(-1)  # (B,)
        loss = distortion if self.reconstruction == "likelihood" else squared_error
        return dict(loss=loss.mean(), distortion=distortion, squared_error=squared_error)

    def __repr__(self) -> str:
        return f"Autoencoder(reconstruction={self.reconstruction!r})"


class RAE(Autoencoder):
    """The regularised deterministic autoencoder of Ghosh et al. (2020), per example:

        loss = reconstruction + embedding_weight * 1/2 ||z||^2 + reg_weight * R(decoder)

    z the encoder's (deterministic) code; reconstruction as `Autoencoder`'s (the paper's is the
    squared error, `mse`); R = `l2`: the decoder's squared weights (RAE-L2), `gp`: the squared
    Frobenius norm of the decoder's Jacobian d mean(x|z) / dz at the code (RAE-GP), estimated
    without bias by Hutchinson's trick, E_v ||v^T J||^2 with v ~ N(0, I) (one vector-Jacobian
    product per step; pythae's RAE_GP uses v = 1, the gradient of the outputs' sum), measured
    only while training (validation has no gradients to take); `none`: the code penalty alone.
    Weights: pythae's MNIST defaults (1e-4, 1e-7). No likelihood is defined: evaluate.py samples
    it through a Gaussian mixture fitted on the training codes (the paper's ex-post density)."""

    REGULARISERS = ("l2", "gp", "none")

    def __init__(
        self,
        reconstruction: str = "mse",
        embedding_weight: float = 1e-4,
        regulariser: str = "l2",
        reg_weight: float = 1e-7,
    ) -> None:
        super().__init__(reconstruction)
        require_number("objective.embedding_weight", embedding_weight, 0)
        require_number("objective.reg_weight", reg_weight, 0)
        require(
            regulariser in self.REGULARISERS,
            f"objective.regulariser must be one of {', '.join(self.REGULARISERS)}, "
            f"got {regulariser!r}",
        )
        self.embedding_weight, self.reg_weight = float(embedding_weight), float(reg_weight)
        self.regulariser = regulariser

    def parts(
        self, model: LatentVariableModel, x: Tensor, target: Tensor, step: int | None
    ) -> dict[str, Tensor]:
        z = model.representation(model.posterior(x))  # (B, D)
        p = model.decode(z)
        distortion = -p.log_prob(target)  # (B,)
        squared_error = (p.mean - target).pow(2).flatten(1).sum(-1)  # (B,)
        reconstruction = distortion if self.reconstruction == "likelihood" else squared_error
        code_penalty = 0.5 * z.pow(2).sum(-1)  # (B,)
        parts = dict(distortion=distortion, squared_error=squared_error, code_penalty=code_penalty)
        loss = reconstruction + self.embedding_weight * code_penalty
        if self.regulariser == "l2":
            squares = sum(w.pow(2).sum() for w in model.decoder.parameters())
            parts["decoder_penalty"] = squares.expand(len(z))
        elif self.regulariser == "gp" and torch.is_grad_enabled() and z.requires_grad:
            v = torch.randn_like(p.mean)
            (vjp,) = torch.autograd.grad(p.mean, z, v, create_graph=True)
            parts["decoder_penalty"] = vjp.pow(2).sum(-1)
        if "decoder_penalty" in parts:
            loss = loss + self.reg_weight * parts["decoder_penalty"]
        return dict(loss=loss.mean(), **parts)

    def __repr__(self) -> str:
        return (
            f"RAE(reconstruction={self.reconstruction!r}, embedding_weight="
            f"{self.embedding_weight}, regulariser={self.regulariser!r}, reg_weight="
            f"{self.reg_weight})"
        )


class VQ(Objective):
    """The VQ-VAE objective (van den Oord et al. 2017, eq. 3), per example:

        loss = -log p(x | z_q) + beta ||z_e - sg(z_q)||^2 [+ ||sg(z_e) - z_q||^2] - log p(k(x))

    with straight-through gradients from z_q to the encoder; the codebook term only when the
    model's codebook is trained by its loss (`model.codebook=loss`; EMA updates otherwise). The
    last term is the code prior's negative log-likelihood of the code grid: h w log K for the
    uniform prior (no gradient), the PixelCNN's NLL when it is learned (which is how the second
    stage trains it). Reports `elbo` = log p(x | z_q) + log p(k(x)), the bound of the point-mass
    posterior (so bits/dim), its `rate` and `distortion`, the `commitment` loss, and the batch's
    codebook `perplexity` (K for a uniform use of all codes) and `usage` (fraction used).
    """

    trains_codes = True

    def __init__(self, beta: float = 0.25) -> None:
        require_number("objective.beta", beta, 0)
        self.beta = float(beta)

    def check_model(self, model: LatentVariableModel) -> None:
        require(
            model.vector_quantised,
            f"objective=vq trains a vector-quantised model (model=vqvae), got "
            f"{type(model).__name__}; use objective=elbo or iwae with it",
        )

    def parts(
        self, model: LatentVariableModel, x: Tensor, target: Tensor, step: int | None
    ) -> dict[str, Tensor]:
        self.check_model(model)
        codes = model.quantize(x)
        distortion = -model.decode_vectors(codes["z_q"]).log_prob(target)  # (B,)
        rate = -model.prior().log_prob(codes["indices"])  # (B,)
        loss = distortion + self.beta * codes["commitment"] + rate
        if model.quantizer.codebook == "loss":
            loss = loss + codes["codebook_loss"]
        return bound_parts(
            loss.mean(),
            distortion,
            rate,
            commitment=codes["commitment"],
            perplexity=codes["perplexity"],
            usage=codes["usage"],
        )

    def __repr__(self) -> str:
        return f"VQ(beta={self.beta})"
