"""The ex-post density of a deterministic autoencoder's codes (Ghosh et al. 2020): a Gaussian
mixture with full covariances fitted by EM (scikit-learn) on the codes of the training images,
so that a model without a prior over its codes (objective=ae, rae) can be sampled, and its
traversals span where its codes are."""

from __future__ import annotations

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

#: the paper's mixture: 10 components, full covariances
COMPONENTS = 10


@torch.no_grad()
def training_codes(model, datamodule, device: torch.device, max_codes: int) -> torch.Tensor:
    """The codes (representation) of up to `max_codes` training images, in the training
    loader's order, (N, D) float64 on the CPU."""
    datamodule.setup("fit")
    codes, total = [], 0
    for batch in datamodule.train_dataloader():
        inputs, _, _ = datamodule.fetch(move_data_to_device(batch, device))
        codes.append(model.representation(model.posterior(inputs)).double().cpu())
        total += len(codes[-1])
        if total >= max_codes:
            break
    return torch.cat(codes)[:max_codes]


def fit_mixture(codes: torch.Tensor, n_components: int = COMPONENTS, seed: int = 0):
    """A Gaussian mixture fitted on codes (N, D) as a torch distribution (float64)."""
    from sklearn.mixture import GaussianMixture

    n_components = min(n_components, len(codes))
    mixture = GaussianMixture(
        n_components, covariance_type="full", random_state=seed, reg_covar=1e-6
    ).fit(codes.numpy())
    return MixtureSameFamily(
        Categorical(probs=torch.from_numpy(mixture.weights_)),
        MultivariateNormal(
            torch.from_numpy(mixture.means_),
            covariance_matrix=torch.from_numpy(mixture.covariances_),
        ),
    )


def code_density(model, datamodule, device: torch.device, max_codes: int = 20000, seed: int = 0):
    """(the mixture fitted on up to `max_codes` training codes, moved to `device` in float32,
    how many codes it saw)."""
    codes = training_codes(model, datamodule, device, max_codes)
    mixture = fit_mixture(codes, seed=seed)
    components = mixture.component_distribution
    on_device = MixtureSameFamily(
        Categorical(probs=mixture.mixture_distribution.probs.float().to(device)),
        MultivariateNormal(
            components.loc.float().to(device), scale_tril=components.scale_tril.float().to(device)
        ),
    )
    return on_device, len(codes)
