"""Pictures of a trained model, saved as PNG files and logged to TensorBoard.

- reconstructions (inputs above reconstructions) and samples from the model's prior (one row per
  class for a conditional model, whose manifold and traversals are not drawn);
- one flat latent of 2 dimensions: the learned manifold, decoded over a grid of the prior's
  marginal quantiles (Kingma & Welling 2013, Fig. 4: exact Gaussian quantiles for a Gaussian
  prior, empirical quantiles of prior draws for any other, e.g. a mixture), and a scatter of
  posterior means coloured by label;
- more dimensions: traversals of the highest-KL (or most active) dimensions over the prior's
  central 99.7% (its 0.15% and 99.85% marginal quantiles; [-3, 3] for N(0, I)) from a few test
  images, a PCA projection of posterior means coloured by label, and the posterior means in
  TensorBoard's embedding projector (label metadata, image sprites).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.distributions import Distribution  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from vaelab.models import LatentVariableModel  # noqa: E402
from vaelab.models.base import prior_quantiles  # noqa: E402

MANIFOLD_SIZE = 20
TRAVERSAL_STEPS = 11
TRAVERSAL_DIMS = 8
TRAVERSAL_IMAGES = 3
EMBEDDING_POINTS = 2000


@torch.no_grad()
def grid(images: Tensor, nrow: int = 8) -> Tensor:
    """(N, C, H, W) -> (C, H', W') image grid, values clamped to [0, 1]."""
    return torchvision.utils.make_grid(images.detach().clamp(0, 1).cpu(), nrow=nrow, pad_value=1)


def pair_grid(inputs: Tensor, reconstructions: Tensor, targets: Tensor | None = None) -> Tensor:
    """Rows: the inputs, their reconstructions, and (when the inputs were corrupted, as for a
    denoising autoencoder) the clean targets."""
    rows = [inputs, reconstructions]
    if targets is not None and not torch.equal(targets, inputs):
        rows.append(targets)
    return grid(torch.cat(rows), nrow=len(inputs))


def image_grids(
    model: LatentVariableModel,
    inputs: Tensor,
    kl_order: list[int],
    seed: int = 0,
    targets: Tensor | None = None,
    labels: Tensor | None = None,
    code_density: Distribution | None = None,
) -> dict[str, Tensor]:
    """Image grids (C, H, W) by name, from a few preprocessed inputs on the model's device
    (and their clean targets, shown below the reconstructions when the inputs are corrupted;
    their labels, which a conditional model reads). The prior's draws come from `seed`, without
    touching the caller's random state; a conditional model's samples have one row per class.
    `code_density`: draw the samples (and place the traversals) from this density over the
    codes instead of the model's prior (a deterministic autoencoder's ex-post mixture)."""
    inputs = inputs[:16]
    labels = labels[: len(inputs)].to(inputs.device) if labels is not None else None
    sample_labels = model.sample_labels(64)
    with torch.random.fork_rng(devices=[inputs.device] if inputs.device.type == "cuda" else []):
        torch.manual_seed(seed)
        given = model.given(sample_labels)
        if code_density is None:
            prior = given.prior()
            codes = given.sample_codes(64 if sample_labels is None else len(sample_labels))
        else:
            prior, codes = code_density, code_density.sample((64,))
        samples = given.decode(codes).mean
        quantiles = None
        flat = model.flat_code_dim is not None
        if flat:
            probabilities = torch.linspace(0.05, 0.95, MANIFOLD_SIZE)
            if model.flat_code_dim > 2:
                probabilities = torch.tensor([0.00135, 0.99865])
            quantiles = prior_quantiles(prior, probabilities)  # (P, D)
    reconstructions = model.given(labels).reconstruct(inputs)
    grids = {
        "reconstructions": pair_grid(inputs, reconstructions, targets),
        "samples": grid(samples, nrow=samples_per_row(sample_labels)),
    }
    if flat and model.flat_code_dim == 2:
        # rows: z_2 from high to low, columns: z_1 from low to high (as in a plot)
        z2, z1 = torch.meshgrid(quantiles[:, 1].flip(0), quantiles[:, 0], indexing="ij")
        grid_codes = torch.stack([z1, z2], dim=-1).reshape(-1, 2).to(inputs.device)
        grids["manifold"] = grid(model.decode(grid_codes).mean, nrow=MANIFOLD_SIZE)
    elif flat:
        grids["traversals"] = traversals(model, inputs[:TRAVERSAL_IMAGES], kl_order, quantiles)
    return grids


def samples_per_row(sample_labels: Tensor | None) -> int:
    """8 columns; a conditional model's samples: as many as each class has (a row per class)."""
    return 8 if sample_labels is None else int((sample_labels == sample_labels[0]).sum())


def traversal_decodes(
    model: LatentVariableModel,
    inputs: Tensor,
    dims: list[int],
    limits: Tensor,
    steps: int = TRAVERSAL_STEPS,
) -> Tensor:
    """Means of p(x|z) with each dimension d of `dims` of E_q[z] swept over `steps` values from
    limits[0, d] to limits[1, d] (the prior's marginal quantiles): (S, K, N, C, H, W) for S
    steps, K dimensions and N images."""
    fractions = torch.linspace(0, 1, steps, device=inputs.device)
    limits = limits.to(inputs.device)
    means = model.posterior(inputs).mean  # (N, D)
    codes = means[None, None].repeat(steps, len(dims), 1, 1)  # (S, K, N, D)
    for row, dim in enumerate(dims):
        values = limits[0, dim] + fractions * (limits[1, dim] - limits[0, dim])  # (S,)
        codes[:, row, :, dim] = values[:, None]
    decoded = model.decode(codes.reshape(-1, means.shape[-1])).mean
    return decoded.reshape(steps, len(dims), len(inputs), *decoded.shape[1:])


def traversals(
    model: LatentVariableModel, inputs: Tensor, kl_order: list[int], limits: Tensor
) -> Tensor:
    """One row per (image, top dimension): that dimension of E_q[z] swept from limits[0, d] to
    limits[1, d] (the prior's marginal quantiles)."""
    decoded = traversal_decodes(model, inputs, kl_order[:TRAVERSAL_DIMS], limits)
    return grid(decoded.permute(2, 1, 0, 3, 4, 5).flatten(0, 2), nrow=TRAVERSAL_STEPS)


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
    colours = class_labels(labels)
    scatter = axes.scatter(points[:, 0], points[:, 1], c=colours, cmap="tab10", s=4, alpha=0.7)
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
    """Posterior means in TensorBoard's projector, with labels and image sprites. A second
    evaluation of the same checkpoint (same step) replaces the first one's files."""
    previous = Path(writer.log_dir) / f"{step:05d}" / tag  # the writer's layout for plain tags
    if previous.is_dir():
        shutil.rmtree(previous)
    n = min(EMBEDDING_POINTS, len(means))
    writer.add_embedding(
        means[:n],
        metadata=class_labels(labels)[:n].tolist(),
        label_img=images[:n].float().clamp(0, 1),
        global_step=step,
        tag=tag,
    )


def class_labels(labels: Tensor) -> Tensor:
    """Labels to colour points by: the labels, or the first factor of factor labels (N, F)."""
    return labels[:, 0] if labels.dim() == 2 else labels


@torch.no_grad()
def traversal_frames(
    model: LatentVariableModel,
    inputs: Tensor,
    dims: list[int],
    limits: Tensor,
    steps: int = TRAVERSAL_STEPS,
) -> tuple[list[Tensor], Tensor]:
    """Latent traversals of every dimension in `dims` from a few images: (frames, grid).

    frame s (for an animated GIF) has one row per dimension and one column per image, each
    dimension of E_q[z] set to the s-th of `steps` values from limits[0, d] to limits[1, d];
    `grid` (a PNG) has one row per dimension and one column per value, for the first image."""
    decoded = traversal_decodes(model, inputs, dims, limits, steps)
    frames = [grid(decoded[s].flatten(0, 1), nrow=len(inputs)) for s in range(steps)]
    first = decoded[:, :, 0].transpose(0, 1).flatten(0, 1)  # (K * S, C, H, W)
    return frames, grid(first, nrow=steps)


def gif_bytes(frames: list[Tensor], seconds_per_frame: float = 0.15) -> bytes:
    """An animated GIF, looping forth and back, of image grids (C, H, W) in [0, 1]."""
    import io

    from PIL import Image

    images = [
        Image.fromarray(f.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).squeeze(-1).numpy())
        for f in frames
    ]
    images = images + images[-2:0:-1]
    buffer = io.BytesIO()
    images[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=int(1000 * seconds_per_frame),
        loop=0,
    )
    return buffer.getvalue()


def add_gif(writer: SummaryWriter, tag: str, data: bytes, height: int, width: int, step: int):
    """An animated GIF in TensorBoard's Images tab (an image summary holding GIF bytes, which
    is what add_video writes, without its moviepy dependency)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    image = Summary.Image(height=height, width=width, colorspace=1, encoded_image_string=data)
    writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def factor_mi_figure(mi_matrix, factor_names: tuple[str, ...], title: str) -> plt.Figure:
    """Heat map of MI(z_d; v_k) / H(v_k): factors in rows, latent dimensions in columns."""
    matrix = torch.as_tensor(mi_matrix).T  # (F, D)
    figure, axes = plt.subplots(figsize=(1.2 + 0.55 * matrix.shape[1], 1 + 0.5 * len(matrix)))
    image = axes.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    axes.set_xticks(range(matrix.shape[1]), [f"z{d}" for d in range(matrix.shape[1])])
    axes.set_yticks(range(len(matrix)), list(factor_names))
    for (k, d), value in zip(
        [(k, d) for k in range(len(matrix)) for d in range(matrix.shape[1])],
        matrix.flatten().tolist(),
        strict=True,
    ):
        axes.text(
            d,
            k,
            f"{value:.2f}",
            ha="center",
            va="center",
            fontsize=7,
            color="black" if value > 0.5 else "white",
        )
    figure.colorbar(image, ax=axes, label="MI / H(factor)")
    axes.set(xlabel="latent dimension", title=title)
    figure.tight_layout()
    return figure
