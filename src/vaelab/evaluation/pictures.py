"""Pictures of a trained VAE, saved as PNG files and logged to TensorBoard.

- reconstructions (inputs above reconstructions) and samples from the prior;
- latent_dim == 2: the learned manifold, decoded over a grid of the prior's quantiles (Kingma &
  Welling 2013, Fig. 4), and a scatter of posterior means coloured by label;
- latent_dim > 2: traversals of the highest-KL dimensions over [-3, 3] from a few test images, a
  PCA projection of posterior means coloured by label, and the posterior means in TensorBoard's
  embedding projector (label metadata, image sprites).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.distributions import Normal  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from vaelab.callbacks.images import grid, pair_grid  # noqa: E402
from vaelab.vae import VAE  # noqa: E402

MANIFOLD_SIZE = 20
TRAVERSAL_STEPS = 11
TRAVERSAL_DIMS = 8
TRAVERSAL_IMAGES = 3
EMBEDDING_POINTS = 2000


@torch.no_grad()
def image_grids(
    vae: VAE, inputs: Tensor, kl_order: list[int], seed: int = 0, targets: Tensor | None = None
) -> dict[str, Tensor]:
    """Image grids (C, H, W) by name, from a few preprocessed inputs on the model's device
    (and their clean targets, shown below the reconstructions when the inputs are corrupted)."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(64, vae.latent_dim, generator=generator).to(inputs.device)
    grids = {
        "reconstructions": pair_grid(inputs[:16], vae.reconstruct(inputs[:16]), targets),
        "samples": grid(vae.decode(z).mean),
    }
    if vae.latent_dim == 2:
        quantiles = torch.linspace(0.05, 0.95, MANIFOLD_SIZE)
        values = Normal(0.0, 1.0).icdf(quantiles)
        # rows: z_2 from high to low, columns: z_1 from low to high (as in a plot)
        z2, z1 = torch.meshgrid(values.flip(0), values, indexing="ij")
        codes = torch.stack([z1, z2], dim=-1).reshape(-1, 2).to(inputs.device)
        grids["manifold"] = grid(vae.decode(codes).mean, nrow=MANIFOLD_SIZE)
    else:
        grids["traversals"] = traversals(vae, inputs[:TRAVERSAL_IMAGES], kl_order)
    return grids


def traversals(vae: VAE, inputs: Tensor, kl_order: list[int]) -> Tensor:
    """One row per (image, top-KL dimension): that dimension of E_q[z] swept over [-3, 3]."""
    dims = kl_order[:TRAVERSAL_DIMS]
    steps = torch.linspace(-3, 3, TRAVERSAL_STEPS, device=inputs.device)
    means = vae.posterior(inputs).mean  # (N, latent_dim)
    codes = means[:, None, None, :].repeat(1, len(dims), TRAVERSAL_STEPS, 1)  # (N, D, S, L)
    for row, dim in enumerate(dims):
        codes[:, row, :, dim] = steps
    decoded = vae.decode(codes.reshape(-1, vae.latent_dim)).mean
    return grid(decoded, nrow=TRAVERSAL_STEPS)


def latent_scatter(means: Tensor, labels: Tensor, title: str) -> plt.Figure:
    """Scatter of 2-D points coloured by label (PCA first when latent_dim > 2)."""
    if means.shape[1] > 2:
        centred = means - means.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        points = centred @ v[:2].T
        axes_labels = ("principal component 1", "principal component 2")
    else:
        points = means
        axes_labels = ("z_1", "z_2")
    figure, axes = plt.subplots(figsize=(6, 5))
    scatter = axes.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=4, alpha=0.7)
    figure.colorbar(scatter, ax=axes, label="label")
    axes.set(xlabel=axes_labels[0], ylabel=axes_labels[1], title=title)
    figure.tight_layout()
    return figure


def log_embedding(
    writer: SummaryWriter,
    means: Tensor,
    labels: Tensor,
    images: Tensor,
    step: int,
    tag: str = "posterior_mean",
) -> None:
    """Posterior means in TensorBoard's projector, with labels and image sprites."""
    n = min(EMBEDDING_POINTS, len(means))
    writer.add_embedding(
        means[:n],
        metadata=labels[:n].tolist(),
        label_img=images[:n].float().clamp(0, 1),
        global_step=step,
        tag=tag,
    )
