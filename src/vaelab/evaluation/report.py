"""What an evaluation writes: the pictures (PNG files and the run's TensorBoard), the text table,
and how bits per dimension follow from the NLL."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torchvision
from torch.utils.tensorboard import SummaryWriter

from vaelab.evaluation import pictures


def bpd_protocol(bpd_offset: float | None, pixel_model: str = "binary") -> str:
    """How bits per dimension follow from the NLL for this likelihood and pixel model."""
    if bpd_offset is None:
        return "bpd undefined (a density on values that are not dequantised)"
    if bpd_offset == 0 and pixel_model == "discrete":
        return "bpd = nll / (D ln 2), a discretised likelihood: probabilities of the 256 values"
    if bpd_offset == 0:
        return "bpd = nll / (D ln 2)"
    return "bpd = (nll / D + ln 256) / ln 2, a density on dequantised values (Theis et al. 2016)"


def draw(
    model,
    results,
    kl_order,
    out_dir: Path,
    run_dir: Path | None,
    report,
    seed: int,
    tensorboard_metrics: dict[str, float],
    subset: str = "",
    factor_pictures: dict | None = None,
    code_density=None,
) -> None:
    """PNG files in out_dir; the same pictures and `tensorboard_metrics` in the run's
    TensorBoard. `subset` ("_first{n}" for an `eval.limit` pass) goes into the tags of what was
    computed from the subset (the caller's metric names, `eval{subset}/...` pictures, the
    projector's embedding), so they do not sit beside the whole split's at the same step."""
    examples, inputs = results.cat("examples"), results.cat("example_inputs")
    device = next(model.parameters()).device
    grids = pictures.image_grids(
        model,
        inputs[:16].to(device),
        kl_order,
        seed=seed,
        targets=examples[:16].to(device),
        labels=results.cat("labels")[:16],
        code_density=code_density,
    )
    for name, image in grids.items():
        torchvision.utils.save_image(image, out_dir / f"{name}.png")
    if factor_pictures is not None:
        frames = factor_pictures["traversal_frames"]
        gif = pictures.gif_bytes(frames)
        (out_dir / "traversals.gif").write_bytes(gif)
        torchvision.utils.save_image(
            factor_pictures["traversals_all"], out_dir / "traversals_all.png"
        )
        factor_pictures["factor_mi"].savefig(out_dir / "factor_mi.png", dpi=120)
    means, labels = results.cat("posterior_mean"), results.cat("labels")
    name = "latent_scatter" if model.latent_dim == 2 else "latent_pca"
    figure = pictures.latent_scatter(means, labels, f"posterior means ({report['split']} split)")
    figure.savefig(out_dir / f"{name}.png", dpi=120)

    if run_dir is None or not (run_dir / "tensorboard").is_dir():
        plt.close(figure)
        if factor_pictures is not None:
            plt.close(factor_pictures["factor_mi"])
        return
    step = report["global_step"] or 0
    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for key, value in tensorboard_metrics.items():
            if math.isfinite(value):
                writer.add_scalar(key, value, step)
        for image_name, image in grids.items():
            writer.add_image(f"eval{subset}/{image_name}", image, step)
        writer.add_figure(f"eval{subset}/{name}", figure, step)
        if factor_pictures is not None:
            writer.add_figure("eval/factor_mi", factor_pictures["factor_mi"], step)
            writer.add_image("eval/traversals_all", factor_pictures["traversals_all"], step)
            pictures.add_gif(writer, "eval/traversals_gif", gif, *frames[0].shape[1:], step)
        if means.shape[1] > 2:
            pictures.log_embedding(writer, means, labels, examples, step, f"posterior_mean{subset}")


def format_table(report: dict[str, Any]) -> str:
    metrics = report["metrics"]
    width = max(len(name) for name in metrics)
    lines = [
        f"checkpoint: {report['checkpoint']}",
        f"objective: {report['objective']}",
        f"data: {report['pixel_model']}",
        *([f"note: {report['note']}"] if "note" in report else []),
        f"nll_is: {report['nll_is']}"
        if "nll_is" in report
        else f"importance sampling: k={report['k']} on {report['examples_importance_sampled']} "
        f"{report['split']} examples, {report['seconds']:.1f} s on {report['device']}",
        *([f"samples: {report['samples']}"] if "samples" in report else []),
    ]
    lines += [f"  {name:<{width}}  {value:12.4f}" for name, value in sorted(metrics.items())]
    return "\n".join(lines)
