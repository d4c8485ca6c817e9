"""Objectives of autoencoders whose codes are not a Gaussian draw: the deterministic
autoencoder baseline and the VQ-VAE's."""

from __future__ import annotations

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
