"""Disentanglement evaluation: the metrics of vaelab.evaluation.factor_metrics (MIG, DCI, SAP,
the beta-VAE and FactorVAE scores, after disentanglement_lib: Locatello et al. 2019) run under a
`Protocol` of sample counts on a model's codes of a factor grid, with a report and pictures.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import Tensor

from vaelab.errors import require, require_int
from vaelab.evaluation.factor_metrics import (
    beta_vae_score,
    dci,
    factor_vae_score,
    mig,
    sap,
)

DCI_MODELS = ("gbt", "lgbm", "lasso")
GRID_PRECISIONS = ("auto", "32", "bf16")
METRICS = ("mig", "dci", "sap", "beta_vae", "factor_vae")


@dataclass
class Protocol:
    """Numbers of points and settings of each metric (disentanglement_lib's defaults; DCI's
    trees are LightGBM's, checked against scikit-learn's in docs/disentanglement.md), and the
    precision the grid is encoded in (`encode_grid`)."""

    metrics: tuple[str, ...] = METRICS
    mig_points: int = 10000
    bins: int = 20
    dci_train: int = 10000
    dci_test: int = 5000
    dci_model: str = "lgbm"
    sap_train: int = 10000
    sap_test: int = 5000
    score_batch: int = 64
    beta_vae_train: int = 10000
    beta_vae_eval: int = 5000
    factor_vae_train: int = 10000
    factor_vae_eval: int = 5000
    factor_vae_variance_points: int = 10000
    seed: int = 0
    grid_precision: str = "auto"

    def __post_init__(self) -> None:
        self.metrics = tuple(self.metrics)
        for name in self.metrics:
            require(
                name in METRICS,
                f"disentanglement metric {name!r} is not one of {', '.join(METRICS)}",
            )
        require(
            self.grid_precision in GRID_PRECISIONS,
            f"grid_precision must be one of {', '.join(GRID_PRECISIONS)}, "
            f"got {self.grid_precision!r}",
        )
        require(
            self.dci_model in DCI_MODELS,
            f"dci_model must be one of {', '.join(DCI_MODELS)}, got {self.dci_model!r}",
        )
        for key, value in asdict(self).items():
            if key not in ("metrics", "dci_model", "grid_precision"):
                require_int(f"disentanglement.{key}", value, 0 if key == "seed" else 1)


def protocol_from(settings, owner: str) -> Protocol:
    """A Protocol from a config's dict of fields to change (None: the defaults); an unknown
    field is one line naming it and the known ones."""
    settings = dict(settings or {})
    known = [f.name for f in fields(Protocol)]
    for key in settings:
        require(
            key in known,
            f"{owner} has no setting {key!r}; the settings are {', '.join(known)}",
        )
    return Protocol(**settings)


#: Grids of at least this many images are encoded through torch.compile (a few seconds to
#: compile; dSprites' 737,280 images encode about 1.4x faster: benchmarks/README.md).
COMPILE_FROM = 100_000


def encode_grid(
    model,
    datamodule,
    device: torch.device,
    batch_size: int = 2048,
    precision: str = "auto",
    compile: bool | None = None,
) -> Tensor:
    """The model's representation (posterior means) of every image of the data's factor grid,
    (len(grid), D) float32 on the CPU, in grid order. `precision`: `32`, `bf16` (autocast) or
    `auto` (bf16 where it is native: vaelab.hardware.native_bf16; the metrics' values move by
    about 0.001 with it, docs/disentanglement.md). `compile` (None: for grids of `COMPILE_FROM`
    images or more): through torch.compile, one shape (the last batch is padded)."""
    require(
        precision in GRID_PRECISIONS,
        f"the grid's precision must be one of {', '.join(GRID_PRECISIONS)}, got {precision!r}",
    )
    from vaelab.compiled import Compiled
    from vaelab.hardware import native_bf16

    images = datamodule.factor_grid()
    bf16 = precision == "bf16" or (precision == "auto" and native_bf16(device))
    bf16 = bf16 and model_dtype(model) == torch.float32

    def encode(x: Tensor) -> Tensor:
        return model.representation(model.posterior(x))

    if len(images) >= COMPILE_FROM if compile is None else compile:
        encode = Compiled(encode, "disentanglement grid", {}, "encoding eagerly")
    codes = []
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            n = len(chunk)
            if n < batch_size and len(images) >= batch_size:  # the shape compiled for
                chunk = torch.cat([chunk, chunk[:1].expand(batch_size - n, *chunk.shape[1:])])
            x = datamodule.preprocess(chunk.to(device)).to(model_dtype(model))
            codes.append(encode(x)[:n].float().cpu())
    return torch.cat(codes)


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def evaluate(grid_codes: Tensor, factors, protocol: Protocol | None = None, progress=None) -> dict:
    """Every metric of the protocol from the codes of a full factor grid (`encode_grid`), with
    `factors` its FactorSpace. Scalars under their names; matrices under `*_matrix`; the seconds
    each metric took under `seconds`. `progress(line)` hears one line per metric done."""
    protocol = protocol or Protocol()
    generator = torch.Generator().manual_seed(protocol.seed)
    sizes = factors.sizes

    def codes_of(indices: Tensor) -> Tensor:
        return grid_codes[factors.index(indices)]

    def sample(n: int) -> tuple[Tensor, Tensor]:
        indices = factors.sample(n, generator)
        return codes_of(indices), indices

    p = protocol
    runs = {
        "mig": lambda: mig(*sample(p.mig_points), bins=p.bins),
        "dci": lambda: dci(
            *sample(p.dci_train), *sample(p.dci_test), model=p.dci_model, seed=p.seed
        ),
        "sap": lambda: sap(*sample(p.sap_train), *sample(p.sap_test)),
        "beta_vae": lambda: beta_vae_score(
            codes_of, sizes, p.beta_vae_train, p.beta_vae_eval, p.score_batch, p.seed
        ),
        "factor_vae": lambda: factor_vae_score(
            codes_of,
            sizes,
            p.factor_vae_train,
            p.factor_vae_eval,
            p.score_batch,
            p.factor_vae_variance_points,
            p.seed,
        ),
    }
    todo = [name for name in METRICS if name in protocol.metrics]  # the fixed order: same draws
    out: dict = {"seconds": {}}
    start = time.perf_counter()
    for done, name in enumerate(todo, 1):
        begin = time.perf_counter()
        out.update(runs[name]())
        out["seconds"][name] = round(time.perf_counter() - begin, 3)
        if progress is not None:
            left = ", ".join(todo[done:]) or "none"
            progress(
                f"disentanglement: {name} in {out['seconds'][name]:.1f} s "
                f"({time.perf_counter() - start:.1f} s so far; left: {left})"
            )
    return out


def scalars(results: dict, prefix: str = "disentanglement/") -> dict[str, float]:
    """The scalar metrics of `evaluate`, named for logs and metrics.json."""
    return {
        f"{prefix}{k}": float(v)
        for k, v in results.items()
        if not k.endswith("_matrix") and k != "seconds"
    }


@torch.no_grad()
def report(
    model,
    datamodule,
    device: torch.device,
    protocol: Protocol | None = None,
    images: int = 4,
    progress=None,
) -> tuple[dict, dict]:
    """(results of `evaluate` on the data's factor grid, pictures): `traversals_all` (a PNG grid:
    one row per latent dimension, most variable first, one column per value over the prior's
    central 99.7%, from one image), `traversal_frames` (the frames of an animated GIF: rows
    dimensions, columns `images` grid images) and `factor_mi` (the MI heat map figure). Draws
    nothing from the caller's random state. `progress(line)`: a line after the grid's encoding
    and after each metric; `results["seconds"]` holds the seconds of each, `encoding` included."""
    from vaelab.evaluation import pictures
    from vaelab.models.base import prior_quantiles

    protocol = protocol or Protocol()
    was_training = model.training
    model.eval()
    # outside the caller's random state (dynamic binarisation draws when encoding the grid)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            if progress is not None:
                progress(f"disentanglement: encoding the grid of {len(datamodule.factors)} images")
            begin = time.perf_counter()
            codes = encode_grid(model, datamodule, device, precision=protocol.grid_precision)
            encoding = round(time.perf_counter() - begin, 3)
            if progress is not None:
                left = ", ".join(m for m in METRICS if m in protocol.metrics)
                progress(
                    f"disentanglement: grid of {len(codes)} images encoded in {encoding:.1f} s "
                    f"(left: {left})"
                )
            results = evaluate(codes, datamodule.factors, protocol, progress)
            results["seconds"] = {"encoding": encoding, **results["seconds"]}
            order = torch.argsort(codes.double().var(0), descending=True).tolist()
            generator = torch.Generator().manual_seed(protocol.seed)
            rows = torch.randint(len(codes), (images,), generator=generator)
            inputs = datamodule.preprocess(datamodule.factor_grid()[rows].to(device))
            inputs = inputs.to(model_dtype(model))
            limits = prior_quantiles(model.prior(), torch.tensor([0.00135, 0.99865]))
            frames, grid = pictures.traversal_frames(model, inputs, order, limits)
        finally:
            model.train(was_training)
    figure = pictures.factor_mi_figure(
        results["mi_matrix"] if "mi_matrix" in results else np.zeros((codes.shape[1], 1)),
        datamodule.factors.names if "mi_matrix" in results else ("(mig off)",),
        "MI(latent; factor) / H(factor)",
    )
    return results, dict(traversals_all=grid, traversal_frames=frames, factor_mi=figure)
