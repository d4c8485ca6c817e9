"""Throughput of vaelab's importance-sampled NLL (k=5000) against a plain PyTorch loop.

All run in this one process on the same weights and binarised MNIST-shaped images: the default
MLP VAE (784-512-256-32, Bernoulli) or, with `--model burda`, the 784-200-200-50 tanh VAE of the
literature presets. The plain loop is what a user writes by hand: per image batch, draw k codes
in chunks, decode, sum Bernoulli log-probs, log-sum-exp. vaelab is timed eagerly and with
`eval.compile` (torch.compile of the importance weights, the default for large evaluations); these
three see the same random draws, so their NLLs agree up to float rounding. A fourth baseline is
the straightforward one-image-at-a-time estimator: each image's k codes decoded in one call (its
own draws, so its NLL differs by Monte-Carlo noise only). Two floors: the decoder's matrix
products alone in the pass's chunks (`eval.max_codes` codes), and in the groups of about
CPU_TILE_CODES codes that the compiled pass decodes each chunk in on a CPU.

    python benchmarks/nll_is.py --images 200 --k 5000 --model burda --batch 500

End to end (`--end-to-end --data-dir <data root>`): `evaluate.py` as a user runs it, on a run of
the model trained for a few steps (here, in a temporary folder) and the first `--images` test
images of real MNIST: the whole evaluation (building, the test pass, compiling, the IS pass,
diagnostics, pictures), in this process (`run()`) and `--repeats` times as the command in a fresh
Python (imports and Hydra included), each against the floor of its IS pass measured in this
process just before and just after it (the machine's speed drifts within minutes). It also
times the same products in the groups the compiled pass decodes them in, a stricter floor.

    python benchmarks/nll_is.py --end-to-end --data-dir <data root> --images 2000 --model burda \\
        --repeats 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torch.nn import functional as F

from vaelab.build import build_model
from vaelab.evaluation.metrics import CPU_TILE_CODES, CompiledLogWeights, examples_per_group
from vaelab.models.vae import bound_log_var
from vaelab.objectives import iwae_bound

CONFIGS = __file__.rsplit("/benchmarks/", 1)[0] + "/configs"


def plain_nll(vae, x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """A straightforward hand-written estimator (the baseline)."""
    enc, dec = vae.encoder, vae.decoder
    mu, log_var = enc(x).chunk(2, dim=-1)
    log_var = bound_log_var(log_var, vae.log_var_bounds, vae.log_var_clamp)  # the same bounds
    std = torch.exp(0.5 * log_var)
    flat_x = x.flatten(1)
    log_ws = []
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        eps = torch.randn(n, *mu.shape)
        z = mu + std * eps  # (n, B, D)
        logits = dec(z.reshape(-1, z.shape[-1])).view(n, len(x), -1)
        log_px = -F.binary_cross_entropy_with_logits(
            logits, flat_x.expand_as(logits), reduction="none"
        ).sum(-1)
        log_pz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_qz = (-0.5 * eps.pow(2) - 0.5 * math.log(2 * math.pi) - 0.5 * log_var).sum(-1)
        log_ws.append(log_px + log_pz - log_qz)
    return -(torch.logsumexp(torch.cat(log_ws), 0) - math.log(k))


def decoder_layers(vae) -> list[tuple[int, int]]:
    """(in, out) of each Linear layer of the decoder, in order."""
    return [
        (m.in_features, m.out_features) for m in vae.decoder.modules() if isinstance(m, nn.Linear)
    ]


def matmul_floor(vae, images: int, batch: int, k: int, max_codes: int, grouped: bool = False):
    """The IS pass's floor: the decoder's float32 matrix products alone for images x k codes,
    in the chunks `iwae_bound` uses (chunk = max_codes // batch samples of `batch` images), on
    preallocated inputs and outputs (no bias, activation, likelihood or log-sum-exp).
    `grouped`: each chunk's products in the groups of about CPU_TILE_CODES codes that the
    compiled pass decodes on a CPU (smaller products whose outputs stay in the caches)."""
    layers = decoder_layers(vae)
    weights = [torch.randn(n_out, n_in) for n_in, n_out in layers]
    chunk = max(1, min(k, max_codes // batch))
    shapes = []
    for start in range(0, images, batch):
        b = min(batch, images - start)
        for s in range(0, k, chunk):
            samples = min(chunk, k - s)
            if not grouped:
                shapes.append(samples * b)
                continue
            per_group = examples_per_group(samples)
            shapes += [samples * min(per_group, b - g) for g in range(0, b, per_group)]
    buffers = {}
    for rows in set(shapes):
        buffers[rows] = [torch.randn(rows, n_in) for n_in, _ in layers] + [
            torch.empty(rows, n_out) for _, n_out in layers
        ]

    def run():
        for rows in shapes:
            ins = buffers[rows][: len(layers)]
            outs = buffers[rows][len(layers) :]
            for w, a, out in zip(weights, ins, outs, strict=True):
                torch.mm(a, w.t(), out=out)

    return run


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def end_to_end(args) -> None:
    """evaluate.py's wall time on `args.images` test images against the IS pass's floor."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from vaelab import evaluate
    from vaelab import train as train_module

    def composed(name: str, overrides: list[str], output_dir: Path):
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            cfg = compose(name, overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.paths.output_dir = cfg.hydra.runtime.output_dir = str(output_dir)
        HydraConfig.instance().set_config(cfg)
        return cfg

    model = ["experiment=mnist_cpu_budget"] if args.model == "burda" else []
    with tempfile.TemporaryDirectory() as root:
        run_dir, out = Path(root) / "run", Path(root) / "evaluation"
        train = [
            *model,
            f"paths.data_dir={args.data_dir}",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=20",
            "+trainer.limit_val_batches=2",
            "trainer.max_time=null",
            "scheduler=none",
            "callbacks.progress_bar.refresh_rate=0",
            "final_evaluation=null",
        ]
        train_module.run(composed("train", train, run_dir))
        settings = [
            f"run={run_dir}",
            f"paths.data_dir={args.data_dir}",
            f"eval.k={args.k}",
            f"eval.limit={args.images}",
            f"eval.max_codes={args.max_codes}",
            "eval.progress_bar=false",
        ]
        vae = evaluate_model(run_dir, args.data_dir)
        batch = 500  # data.eval_batch_size of the presets
        floor = matmul_floor(vae, args.images, batch, args.k, args.max_codes)
        grouped_floor = matmul_floor(vae, args.images, batch, args.k, args.max_codes, grouped=True)
        start = time.perf_counter()
        evaluate.run(composed("evaluate", settings, out))
        total = time.perf_counter() - start
        passed = json.loads((out / "metrics.json").read_text())["seconds"]
        floors = timed(floor, 1)  # the floor right after run(), then after each command
        # the command itself: a fresh Python, imports (torch, Lightning) and Hydra included
        script = Path(__file__).resolve().parents[1] / "evaluate.py"
        commands, command_passes = [], []
        for repeat in range(args.repeats):
            cli = Path(root) / f"cli{repeat}"
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, str(script), *settings, f"hydra.run.dir={cli}"],
                check=True,
                capture_output=True,
            )
            commands.append(time.perf_counter() - start)
            command_passes.append(json.loads((cli / "metrics.json").read_text())["seconds"])
            floors += timed(floor, 1)
        grouped = timed(grouped_floor, 1)[0]
        grouped_ratio = grouped / statistics.mean(timed(floor, 1) + floors[-1:])
    # each command against the mean of the floors measured just before and just after it
    ratios = [c / statistics.mean(floors[i : i + 2]) for i, c in enumerate(commands)]
    pass_ratios = [c / statistics.mean(floors[i : i + 2]) for i, c in enumerate(command_passes)]
    print(
        f"end to end: evaluate.py on {args.images} test images, k={args.k}, model={args.model}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"  run() in this process: {total:.1f} s (the IS pass {passed:.1f} s); the IS pass's "
        f"matrix-product floor right after: {floors[0]:.1f} s; run() / floor "
        f"{total / floors[0]:.2f}x, IS pass / floor {passed / floors[0]:.2f}x"
    )
    for i, (c, r, pr) in enumerate(zip(commands, ratios, pass_ratios, strict=True)):
        print(
            f"  the command #{i + 1}: {c:.1f} s (its IS pass {command_passes[i]:.1f} s) between "
            f"floors of {floors[i]:.1f} and {floors[i + 1]:.1f} s: command / floor {r:.2f}x, "
            f"its IS pass / floor {pr:.2f}x"
        )
    print(f"  command / floor, median of {len(ratios)}: {statistics.median(ratios):.2f}x")
    print(
        f"  the same products in the pass's groups of ~{CPU_TILE_CODES} codes take "
        f"{grouped_ratio:.2f}x the floor's time (a stricter floor: the command's median against "
        f"it is {statistics.median(ratios) / grouped_ratio:.2f}x)"
    )


def evaluate_model(run_dir, data_dir):
    """The run's model, as evaluate.py builds it (for the floor's layer sizes)."""
    from omegaconf import OmegaConf

    from vaelab.build import build_datamodule
    from vaelab.run import plan
    from vaelab.run.checkpoints import find_checkpoint, read_saved
    from vaelab.run.trust import Site

    saved, _ = read_saved(find_checkpoint(run_dir, "best"), [])
    config = OmegaConf.create(plan.evaluation(saved, Site(run_dir, data_dir)))
    return build_model(config, build_datamodule(config).image_shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("default", "burda"), default="default")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--batch", type=int, default=100, help="images per estimator call")
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--max-codes", type=int, default=5000, help="vaelab's eval.max_codes")
    parser.add_argument("--plain-chunk", type=int, default=100, help="samples per plain chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--end-to-end", action="store_true", help="evaluate.py as a whole")
    parser.add_argument("--data-dir", default=None, help="a folder with MNIST/raw/ (end to end)")
    args = parser.parse_args()
    if args.end_to_end:
        end_to_end(args)
        return

    torch.distributions.Distribution.set_default_validate_args(False)
    torch.manual_seed(0)
    overrides = ["experiment=mnist_cpu_budget"] if args.model == "burda" else []
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    vae = build_model(cfg, (1, 28, 28)).eval()
    images = torch.bernoulli(torch.rand(args.images, 1, 28, 28) * 0.3)
    batches = images.split(args.batch)
    compiled = CompiledLogWeights(vae, torch.device("cpu"))

    def run_vaelab(weights_fn=None):
        with torch.no_grad():
            return torch.cat(
                [
                    -iwae_bound(vae, b, args.k, args.max_codes, weights_fn=weights_fn)[
                        "log_likelihood"
                    ]
                    for b in batches
                ]
            )

    def run_compiled():
        return run_vaelab(compiled)

    def run_plain():
        with torch.no_grad():
            return torch.cat([plain_nll(vae, b, args.k, args.plain_chunk) for b in batches])

    def run_one_at_a_time():
        with torch.no_grad():
            return torch.cat([plain_nll(vae, image[None], args.k, args.k) for image in images])

    runs = {
        "floor": matmul_floor(vae, args.images, args.batch, args.k, args.max_codes),
        "grouped_floor": matmul_floor(
            vae, args.images, args.batch, args.k, args.max_codes, grouped=True
        ),
        "vaelab": run_vaelab,
        "compiled": run_compiled,
        "plain": run_plain,
        "one_at_a_time": run_one_at_a_time,
    }
    nll = {}
    for name, run in runs.items():  # also the warm-up (and compilation) of each
        torch.manual_seed(1)
        result = run()
        if result is not None:
            nll[name] = result
    print(
        f"threads={torch.get_num_threads()} model={args.model} images={args.images} k={args.k} "
        f"batch={args.batch} max_codes={args.max_codes} plain_chunk={args.plain_chunk}"
    )
    print(
        "mean NLL: "
        + "  ".join(f"{name} {value.mean():.4f}" for name, value in nll.items())
        + f"  (the first three on the same draws; largest per-image difference compiled vs "
        f"eager: {(nll['compiled'] - nll['vaelab']).abs().max():.1e})"
    )
    times = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so drift of the machine hits all alike
        for name, run in runs.items():
            times[name] += timed(run, 1)
    per_1000 = {name: statistics.median(t) * 1000 / args.images for name, t in times.items()}
    labels = {
        "floor": "matmul floor",
        "grouped_floor": "grouped floor",
        "vaelab": "vaelab eager",
        "compiled": "vaelab compiled",
        "plain": "plain",
        "one_at_a_time": "one at a time",
    }
    for name, seconds in per_1000.items():
        print(f"{labels[name]:>16}: {seconds:7.1f} s per 1000 images (median of {args.repeats})")
    for name in ("vaelab", "compiled"):
        ratio = per_1000[name] / per_1000["floor"]
        print(f"{labels[name]} / its matrix-product floor: {ratio:.2f}x the floor's time")
    ratio = per_1000["compiled"] / per_1000["grouped_floor"]
    print(
        f"{labels['compiled']} / the same products in its groups of ~{CPU_TILE_CODES} codes "
        f"(a stricter floor): {ratio:.2f}x"
    )
    flops = 2 * sum(a * b for a, b in decoder_layers(vae)) * args.k * args.images
    floor_seconds = per_1000["floor"] * args.images / 1000
    print(f"sgemm speed in the floor: {flops / floor_seconds / 1e9:.1f} GFLOP/s")
    for baseline in ("plain", "one_at_a_time"):
        for name in ("vaelab", "compiled"):
            ratio = per_1000[baseline] / per_1000[name]
            print(f"throughput ratio {labels[name]} / {labels[baseline]}: {ratio:.2f}")


if __name__ == "__main__":
    main()
