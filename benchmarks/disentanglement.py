"""The disentanglement suite's time per metric and its values, the reference implementation
(disentanglement_lib's: DCI with scikit-learn's gradient-boosted trees; a trained model's grid
encoded in float32, eagerly) against vaelab's defaults (DCI with LightGBM's trees; the grid
encoded through torch.compile, in bfloat16 where the CPU has it natively), on the same codes:

- reference codes on dsprites_like's factor grid (10 dimensions): `perfect` (each factor in one
  dimension, a little noise, five dimensions of noise), `rotated` (the perfect code mixed by a
  random rotation), `random` (noise only);
- a trained model's codes (`--run <run dir>` of a model trained on data=dsprites_like), with the
  time to encode the whole grid.

    python benchmarks/disentanglement.py --data-dir <data root> [--run <run dir>]
        [--codes perfect,rotated,random] [--skip-reference]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from vaelab.data import DSpritesLike
from vaelab.evaluation.disentanglement import Protocol, evaluate, scalars

VALUES = ("mig", "dci_disentanglement", "dci_completeness", "dci_informativeness", "sap")
SCORES = ("beta_vae_score", "factor_vae_score")


def reference_codes(factors, kind: str, seed: int = 0) -> torch.Tensor:
    """Codes (len(grid), 10) of the grid's images for a reference representation."""
    g = np.random.default_rng(seed)
    grid = factors.grid().numpy().astype(float)  # (N, F) indices
    n, f = grid.shape
    noise = g.standard_normal((n, 10))
    if kind == "random":
        return torch.from_numpy(noise)
    scaled = (grid - grid.mean(0)) / grid.std(0)
    codes = np.concatenate([scaled + 0.05 * noise[:, :f], noise[:, f:]], axis=1)
    if kind == "rotated":
        q, _ = np.linalg.qr(g.standard_normal((10, 10)))
        codes = codes @ q
    return torch.from_numpy(codes)


def model_codes(
    run: Path, data_dir: Path, reference: bool = True
) -> tuple[tuple[torch.Tensor, float], ...]:
    """A trained run's codes of the whole grid and the seconds the encoding took: as the
    reference does it (float32, eager; unless `reference` is False: vaelab's again), then as
    vaelab does by default."""
    from vaelab.build import build_datamodule, build_module
    from vaelab.evaluation.disentanglement import encode_grid
    from vaelab.run import plan
    from vaelab.run.checkpoints import find_checkpoint, read_saved
    from vaelab.run.trust import Site

    path = find_checkpoint(run, "last")
    saved, checkpoint = read_saved(path, [])
    config = plan.evaluation(saved, Site(run, data_dir))
    from omegaconf import OmegaConf

    config = OmegaConf.create(config)
    datamodule = build_datamodule(config)
    module = build_module(config, datamodule)
    module.load_state_dict(checkpoint["state_dict"])
    model = module.model.eval()
    out = []
    for settings in (dict(precision="32", compile=False) if reference else {}, {}):
        start = time.perf_counter()
        codes = encode_grid(model, datamodule, torch.device("cpu"), **settings)
        out.append((codes, time.perf_counter() - start))
    return tuple(out)


def run_suite(codes, factors, protocol: Protocol) -> tuple[dict, float]:
    start = time.perf_counter()
    results = evaluate(codes, factors, protocol)
    return results, time.perf_counter() - start


def table(name: str, reference: tuple[dict, float], fast: tuple[dict, float]) -> None:
    (ref, ref_seconds), (new, new_seconds) = reference, fast
    ref_values, new_values = scalars(ref, ""), scalars(new, "")
    print(f"\n{name}: the suite in {ref_seconds:.1f} s (reference) and {new_seconds:.1f} s")
    print(f"  {'':<22}{'reference':>10}{'vaelab':>10}{'diff':>9}   seconds (ref / vaelab)")
    for metric in (*VALUES, *SCORES):
        a, b = ref_values.get(metric), new_values.get(metric)
        seconds = (ref.get("seconds", {}), new.get("seconds", {}))
        key = metric.split("_")[0] if metric.startswith("dci") else metric.removesuffix("_score")
        ref_time, new_time = (part.get(key, float("nan")) for part in seconds)
        times = f"{ref_time:7.1f} / {new_time:.1f}"
        print(f"  {metric:<22}{a:>10.3f}{b:>10.3f}{b - a:>+9.3f}   {times}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="renders dsprites_like there")
    parser.add_argument("--run", type=Path, default=None, help="a run trained on dsprites_like")
    parser.add_argument("--skip-reference", action="store_true", help="only vaelab's default")
    parser.add_argument(
        "--codes", default="perfect,rotated,random", help="reference codes (comma-separated)"
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    source = DSpritesLike()
    factors = source.factors
    reference = Protocol(dci_model="gbt", grid_precision="32")
    fast = Protocol()
    print(f"dsprites_like factors {dict(zip(factors.names, factors.sizes, strict=True))}")
    kinds = [kind for kind in args.codes.split(",") if kind]
    cases = [(kind, reference_codes(factors, kind), None) for kind in kinds]
    if args.run is not None:
        encodings = model_codes(args.run, args.data_dir, not args.skip_reference)
        (ref_codes, ref_seconds), (codes, seconds) = encodings
        print(
            f"encoding the grid ({len(codes)} images) with {args.run.name}: {ref_seconds:.1f} s "
            f"({'vaelab, first call' if args.skip_reference else 'reference: float32, eager'}), "
            f"{seconds:.1f} s (vaelab); the codes differ by at most "
            f"{(codes - ref_codes).abs().max():.4f} (their spread: {ref_codes.std(0).min():.3f}"
            f" to {ref_codes.std(0).max():.3f})"
        )
        cases.append(("trained model", codes, ref_codes))
    for name, codes, ref_codes in cases:
        fast_run = run_suite(codes, factors, fast)
        if args.skip_reference:
            ref_run = fast_run
        else:
            ref_run = run_suite(codes if ref_codes is None else ref_codes, factors, reference)
        table(name, ref_run, fast_run)


if __name__ == "__main__":
    main()
