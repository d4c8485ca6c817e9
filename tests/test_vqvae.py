"""The VQ-VAE (model=vqvae, objective=vq): the quantiser (nearest codes, straight-through
gradients, EMA updates by hand, perplexity, restarts), the bound against a brute-force log p(x),
the PixelCNN code prior (causal, normalised), shapes, errors, and both training stages end to
end."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from helpers.runs import compose_evaluate, compose_train, tiny, train_error
from omegaconf import OmegaConf

from vaelab import evaluate
from vaelab import train as train_module
from vaelab.likelihoods import Bernoulli, DiscretizedLogistic
from vaelab.models import VQVAE
from vaelab.models.code_priors import AutoregressiveCodes, PixelCNN
from vaelab.models.quantizer import VectorQuantizer, perplexity
from vaelab.objectives import VQ, iwae_bound


def test_codes_are_the_nearest_codebook_vectors():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(7, 3)
    z_e = torch.randn(4, 3, 2, 5)
    out = quantizer.eval()(z_e)
    flat = z_e.movedim(1, -1).reshape(-1, 3)
    expected = torch.cdist(flat, quantizer.embedding).argmin(1).view(4, 2, 5)
    assert torch.equal(out["indices"], expected)
    torch.testing.assert_close(out["z_q"], quantizer.lookup(expected))


def test_straight_through_gradients_reach_the_encoder_unchanged():
    """d loss / d z_e = d loss / d z_q for the reconstruction term (beta = 0)."""
    torch.manual_seed(1)
    model = VQVAE((1, 8, 8), Bernoulli(), n_codes=8, hidden_channels=8, residual_channels=4)
    x = torch.bernoulli(torch.full((3, 1, 8, 8), 0.3))
    z_e = model.encoder(x).detach().requires_grad_(True)
    codes = model.quantizer(z_e)
    z_q = codes["z_q"]
    z_q.retain_grad()
    model.decode_vectors(z_q).log_prob(x).sum().backward()
    assert z_e.grad.abs().sum() > 0
    torch.testing.assert_close(z_e.grad, z_q.grad)
    model.zero_grad()
    VQ(beta=0.25)(model, x)["loss"].backward()
    first, last = model.encoder[0], model.encoder[-1]  # the path through the quantiser
    assert first.weight.grad.abs().sum() > 0 and last.weight.grad.abs().sum() > 0


def test_ema_update_matches_a_hand_computation():
    quantizer = VectorQuantizer(3, 2, codebook="ema", decay=0.9, epsilon=0.1)
    with torch.no_grad():
        quantizer.embedding.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
        quantizer.ema_sum.copy_(quantizer.embedding)
        quantizer.ema_count.fill_(1.0)
    # four vectors: three near code 0, one near code 1, none near code 2
    flat = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [9.0, 1.0]])
    quantizer.train()(flat[:, :, None, None])
    counts = torch.tensor([3.0, 1.0, 0.0])
    sums = torch.tensor([[2.0, 2.0], [9.0, 1.0], [0.0, 0.0]])
    n = 0.9 * torch.ones(3) + 0.1 * counts
    m = 0.9 * torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]) + 0.1 * sums
    smoothed = (n + 0.1) / (n.sum() + 3 * 0.1) * n.sum()
    torch.testing.assert_close(quantizer.ema_count, n)
    torch.testing.assert_close(quantizer.ema_sum, m)
    torch.testing.assert_close(quantizer.embedding, m / smoothed[:, None])
    before = quantizer.embedding.clone()
    quantizer.eval()(flat[:, :, None, None])  # no updates outside training
    assert torch.equal(quantizer.embedding, before)


def test_perplexity_of_uniform_use_is_the_codebook_size():
    assert perplexity(torch.full((16,), 1 / 16)).item() == pytest.approx(16)
    assert perplexity(torch.tensor([1.0, 0.0, 0.0])).item() == pytest.approx(1)
    quantizer = VectorQuantizer(4, 2).eval()
    with torch.no_grad():
        quantizer.embedding.copy_(torch.eye(4, 2) * 5 + torch.tensor([[0.0, 0.0]]))
        quantizer.embedding[3] = torch.tensor([-5.0, -5.0])
    flat = quantizer.embedding.repeat(3, 1)  # each code used three times
    assert quantizer(flat[:, :, None, None])["perplexity"].item() == pytest.approx(4)


def test_dead_codes_restart_at_encoder_outputs():
    torch.manual_seed(2)
    quantizer = VectorQuantizer(4, 2, restart_threshold=0.5, decay=0.5).train()
    with torch.no_grad():
        quantizer.embedding.copy_(torch.tensor([[0.0, 0.0], [50.0, 50.0], [60, 60], [70, 70]]))
        quantizer.ema_sum.copy_(quantizer.embedding)
    flat = 0.1 * torch.randn(32, 2)  # everything near code 0: codes 1-3 die
    for _ in range(3):
        quantizer(flat[:, :, None, None])
    assert quantizer.embedding[1:].abs().max() < 1.0  # moved among the encoder outputs


def test_the_bound_is_below_a_brute_force_log_p_x():
    """A 1x1 code grid of K codes: log p(x) = logsumexp_k [log p(x|e_k) - log K] exactly. The
    VQ bound (and evaluate's estimate) is log p(x) minus the KL of the point mass on k(x) to the
    true posterior, -log p(k(x)|x) >= 0: checked as an identity."""
    torch.manual_seed(3)
    model = VQVAE(
        (1, 2, 2), Bernoulli(), n_codes=5, hidden_channels=4, residual_channels=2, downsamples=1
    ).eval()
    assert model.grid == (1, 1)
    x = torch.bernoulli(torch.full((6, 1, 2, 2), 0.5))
    with torch.no_grad():
        all_codes = torch.arange(5).view(5, 1, 1, 1).expand(5, 6, 1, 1)  # (K, B, 1, 1)
        log_joint = model.decode(all_codes).log_prob(x) - math.log(5)  # (K, B)
        log_px = torch.logsumexp(log_joint, 0)
        chosen = model.posterior(x).indices.view(6)
        log_posterior = (log_joint - log_px)[chosen, torch.arange(6)]  # log p(k(x)|x)
        bound = VQ()(model, x)["elbo"]
        estimate = iwae_bound(model, x, k=50)["log_likelihood"]
    torch.testing.assert_close(estimate, bound)
    torch.testing.assert_close(bound, log_px + log_posterior)
    assert (bound <= log_px + 1e-6).all()


def test_pixelcnn_prior_is_causal_and_normalised():
    torch.manual_seed(4)
    net = PixelCNN(3, channels=8, n_layers=2)
    prior = AutoregressiveCodes(net, (2, 2))
    grids = torch.tensor(list(itertools.product(range(3), repeat=4))).view(-1, 2, 2)  # 81
    with torch.no_grad():
        total = torch.logsumexp(prior.log_prob(grids), 0)
        torch.testing.assert_close(total, torch.tensor(0.0), atol=1e-5, rtol=0)
        codes = torch.randint(0, 3, (1, 4, 4))
        logits = net(codes)
        for position in range(16):
            changed = codes.clone().view(-1)
            changed[position] = (changed[position] + 1) % 3
            moved = (net(changed.view(1, 4, 4)) - logits).abs().sum(1).view(-1) > 1e-6
            assert not moved[: position + 1].any()  # nothing at or before the change moves
    samples = AutoregressiveCodes(net, (3, 4)).sample((5,))
    assert samples.shape == (5, 3, 4) and samples.min() >= 0 and samples.max() < 3


@pytest.mark.parametrize(
    "shape,likelihood,grid",
    [((1, 28, 28), Bernoulli(), (7, 7)), ((3, 32, 32), DiscretizedLogistic(), (8, 8))],
    ids=["1x28x28", "3x32x32"],
)
@pytest.mark.parametrize("code_prior", ["uniform", "pixelcnn"])
def test_shapes(shape, likelihood, grid, code_prior):
    model = VQVAE(shape, likelihood, n_codes=16, hidden_channels=16, code_prior=code_prior)
    x = torch.rand(4, *shape)
    x = x.round() if likelihood.accepts == ("binary",) else (x * 255).round() / 255
    q = model.posterior(x)
    assert q.batch_shape == (4,) and q.event_shape == grid
    z = q.sample((3,))
    assert model.log_weights(x, z, q, model.prior()).shape == (3, 4)
    assert model.reconstruct(x).shape == (4, *shape) and model.sample(2).shape == (2, *shape)
    parts = VQ()(model, x)
    assert {"commitment", "perplexity", "usage"} <= set(parts)
    if code_prior == "uniform":
        torch.testing.assert_close(
            parts["rate"], torch.full((4,), grid[0] * grid[1] * math.log(16))
        )


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        (["model=vqvae", "objective=elbo"], ["model=vqvae trains with objective=vq"]),
        (["objective=vq"], ["objective=vq trains a vector-quantised model"]),
        (["model=vqvae", "objective=vq", "prior=mog"], ["prior group", "does not apply"]),
        (["model=vqvae", "objective=vq", "model.codebook=kmeans"], ["model.codebook", "kmeans"]),
        (["experiment=vqvae_prior"], ["autoencoder_run is required", "autoencoder_run=<value>"]),
    ],
)
def test_errors_are_one_line(overrides, fragments, data_dir, tmp_path):
    args = [o for o in tiny(data_dir) if not o.startswith("model.latent_dim")]
    if "objective=vq" in overrides and len(overrides) == 1:
        args = tiny(data_dir)
    message = train_error([*args, *overrides], tmp_path)
    for fragment in fragments:
        assert fragment in message, message


def vq_overrides(data_dir, tmp_path) -> list[str]:
    return [
        *[o for o in tiny(data_dir) if not o.startswith("model.latent_dim")],
        "model.n_codes=16",
        "model.code_dim=8",
        "model.hidden_channels=16",
        "model.residual_channels=8",
        "model.prior_channels=16",
        "model.prior_layers=2",
        "trainer.max_epochs=2",
        f"paths.log_dir={tmp_path}",
        "final_evaluation=null",  # (evaluated below, in-process)
    ]


@pytest.mark.slow
def test_model_vqvae_alone_selects_its_objective_and_trains(data_dir, tmp_path):
    """model=vqvae brings objective=vq (its YAML's defaults); an explicit objective wins
    (test_errors_are_one_line: objective=elbo is then refused in one line)."""
    overrides = [*vq_overrides(data_dir, tmp_path), "model=vqvae", "trainer.max_epochs=1"]
    cfg = compose_train(overrides, tmp_path / "run")
    assert cfg.objective._target_ == "vaelab.objectives.VQ" and cfg.monitor.metric == "val/elbo"
    metrics = train_module.run(cfg)
    assert {"val/perplexity", "val/commitment"} <= set(metrics)


@pytest.mark.slow
def test_both_stages_train_evaluate_and_resume(data_dir, tmp_path):
    """Stage one (experiment=vqvae), then a PixelCNN prior on its frozen model
    (experiment=vqvae_prior): the frozen weights do not move, the prior's NLL of the codes
    beats the uniform prior's, and evaluate reports the whole model's bound."""
    first_dir = tmp_path / "first"
    cfg = compose_train([*vq_overrides(data_dir, tmp_path), "experiment=vqvae"], first_dir)
    first = train_module.run(cfg)
    assert {"val/perplexity", "val/usage", "val/commitment"} <= set(first)
    (first_dir / ".hydra").mkdir()  # what Hydra's app writes for a run
    saved = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    OmegaConf.save(saved, first_dir / ".hydra" / "config.yaml")

    second_dir = tmp_path / "second"
    overrides = [
        *vq_overrides(data_dir, tmp_path),
        "experiment=vqvae_prior",
        f"autoencoder_run={first_dir}",
    ]
    second = train_module.run(compose_train(overrides, second_dir))
    uniform_rate = 7 * 7 * math.log(16)
    assert second["val/rate"] < uniform_rate - 1  # the PixelCNN learned the codes' statistics
    before = torch.load(first_dir / "checkpoints" / "last.ckpt")["state_dict"]
    after = torch.load(second_dir / "checkpoints" / "last.ckpt")["state_dict"]
    for key, value in before.items():  # encoder, decoder and codebook frozen
        assert torch.equal(after[key], value), key
    assert any(key.startswith("model.code_prior.") for key in after)

    eval_cfg = compose_evaluate(
        [f"run={second_dir / 'checkpoints' / 'last.ckpt'}", f"paths.data_dir={data_dir}"],
        output_dir=tmp_path / "evaluation",
    )
    evaluate.run(eval_cfg)
    report = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert "point-mass posterior" in report["note"]
    metrics = report["metrics"]
    torch.testing.assert_close(metrics["test/nll_is"], -metrics["test/elbo"], atol=1e-3, rtol=0)
    assert (tmp_path / "evaluation" / "samples.png").is_file()

    resumed = compose_train(
        [
            *overrides,
            "trainer.max_epochs=3",
            f"ckpt_path={second_dir / 'checkpoints' / 'last.ckpt'}",
        ],
        tmp_path / "resumed",
    )
    train_module.run(resumed)
    last = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 2
    for key, value in before.items():
        assert torch.equal(last["state_dict"][key], value), key
