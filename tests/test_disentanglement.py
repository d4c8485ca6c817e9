"""Disentanglement: factor data (dSprites file format, the dSprites-like renderer), beta-TCVAE
and FactorVAE objectives, MIG / DCI / SAP / beta-VAE / FactorVAE scores, pictures, and the
disentangle_beta preset end to end."""

from __future__ import annotations

import json
import logging
import math
import subprocess

import numpy as np
import pytest
import torch
from helpers.runs import compose_evaluate, compose_train, train_error
from torch.distributions import Independent, Normal

from vaelab import evaluate
from vaelab import train as train_module
from vaelab.build import build_datamodule
from vaelab.data import DSprites, DSpritesLike, FactorSpace
from vaelab.data.dsprites import DSPRITES_FILE, git_blob_hash
from vaelab.errors import DataError
from vaelab.evaluation import disentanglement as metrics
from vaelab.models.base import LatentVariableModel
from vaelab.objectives import BetaTCVAE, FactorVAE, permute_dims

SMALL_GRID = ["data.source.n_scales=2", "data.source.n_orientations=4", "data.source.n_positions=6"]


def space(sizes=(3, 4, 5, 6)) -> FactorSpace:
    names = tuple(f"f{i}" for i in range(len(sizes)))
    return FactorSpace(names, tuple(torch.arange(s, dtype=torch.float64) for s in sizes))


# --- factor data -----------------------------------------------------------------------------


def test_factor_space_indexes_its_grid_in_order():
    s = space()
    grid = s.grid()
    assert grid.shape == (len(s), 4)
    assert torch.equal(s.index(grid), torch.arange(len(s)))
    sample = s.sample(100, torch.Generator().manual_seed(0))
    assert torch.equal(s.grid()[s.index(sample)], sample)
    assert torch.equal(s.value(sample), sample.double())


def test_dsprites_like_renders_a_deterministic_grid_in_factor_order(tmp_path):
    source = DSpritesLike(n_scales=2, n_orientations=4, n_positions=5)
    source.resize(32)
    images = source.load_grid(tmp_path)
    assert images.shape == (3 * 2 * 4 * 5 * 5, 1, 32, 32) and images.dtype == torch.uint8
    assert set(images.unique().tolist()) == {0, 255}
    again = DSpritesLike(n_scales=2, n_orientations=4, n_positions=5)
    again.resize(32)
    assert torch.equal(again.load_grid(tmp_path), images)  # from the cache
    assert list((tmp_path / "dsprites_like").glob("*.npz"))
    s = source.factors
    on = images.flatten(1).float().mean(1)
    by = s.grid()
    # larger scale, more pixels on; shapes differ; posX moves the sprite right
    assert on[by[:, 1] == 1].mean() > 1.5 * on[by[:, 1] == 0].mean()
    per_shape = [images[by[:, 0] == k].float().mean(0) for k in range(3)]
    assert not torch.allclose(per_shape[0], per_shape[1])
    columns = torch.arange(32, dtype=torch.float32)
    left = images[s.index(torch.tensor([0, 1, 0, 0, 2]))][0].float()
    right = images[s.index(torch.tensor([0, 1, 0, 4, 2]))][0].float()
    assert (right.sum(0) * columns).sum() / right.sum() > (left.sum(0) * columns).sum() / left.sum()


def test_dsprites_like_datamodule_serves_factor_labels(tmp_path):
    cfg = compose_train(
        [
            "data=dsprites_like",
            *SMALL_GRID,
            "data.image_size=16",
            "data.val_size=50",
            "data.source.test_size=40",
            f"paths.data_dir={tmp_path}",
        ]
    )
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    datamodule.setup("test")
    assert datamodule.image_shape == (1, 16, 16)
    assert datamodule.train_size == 3 * 2 * 4 * 6 * 6 - 50
    assert datamodule.factors.names == ("shape", "scale", "orientation", "posX", "posY")
    assert datamodule.splits["train"].labels.shape[1] == 5
    assert len(datamodule.splits["test"]) == 40
    inputs, _, labels = datamodule.fetch(next(iter(datamodule.train_dataloader())))
    assert labels.shape == (64, 5) and set(inputs.unique().tolist()) <= {0.0, 1.0}


def write_fake_dsprites(folder, sizes=(3, 2, 2, 4, 4), seed=0):
    """A small file in dSprites' format (arrays imgs, latents_classes, latents_values), its
    rows shuffled; returns (images in grid order, factor space)."""
    folder.mkdir(parents=True, exist_ok=True)
    s = space(sizes)
    grid = s.grid().numpy()
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 2, size=(len(grid), 64, 64), dtype=np.uint8)
    order = rng.permutation(len(grid))
    classes = np.concatenate([np.zeros((len(grid), 1), np.int64), grid], 1)[order]
    values = classes.astype(np.float64) * 0.5
    np.savez(
        folder / DSPRITES_FILE, imgs=images[order], latents_classes=classes, latents_values=values
    )
    return torch.as_tensor(images), s


def test_dsprites_reads_the_file_format_in_grid_order(tmp_path):
    images, _ = write_fake_dsprites(tmp_path / "dsprites")
    source = DSprites(verify=False, test_size=10)
    assert source.missing(tmp_path) == []
    grid = source.grid_images(tmp_path)
    assert torch.equal(grid[:, 0], images * 255)
    assert source.factors.sizes == (3, 2, 2, 4, 4)
    torch.testing.assert_close(source.factors.values[3], torch.arange(4.0, dtype=torch.float64) / 2)
    test_images, test_labels = source.read(tmp_path, "test")
    assert torch.equal(test_images, grid[source.factors.index(test_labels)])


def test_dsprites_checks_the_official_hash_and_says_what_is_wrong(tmp_path):
    write_fake_dsprites(tmp_path / "dsprites")
    with pytest.raises(DataError, match="git blob hash .* official file has d98996d3"):
        DSprites(verify=True).grid_images(tmp_path)
    (tmp_path / "dsprites" / DSPRITES_FILE).write_bytes(b"not an npz")
    with pytest.raises(DataError, match="not the dSprites file"):
        DSprites(verify=False).grid_images(tmp_path)


def test_git_blob_hash_is_gits(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(bytes(range(256)) * 1000)
    git = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True)
    assert git.returncode == 0, git.stderr
    assert git_blob_hash(path) == git.stdout.strip()


def test_missing_dsprites_file_is_one_line(tmp_path):
    error = train_error(
        ["data=dsprites", f"paths.data_dir={tmp_path / 'empty'}", "data.download=false"], tmp_path
    )
    assert DSPRITES_FILE in error and "data.download=false" in error


# --- metrics on synthetic codes with known answers ---------------------------------------------


@pytest.fixture(scope="module")
def codes():
    s = space()
    grid = s.grid().double()
    perfect = torch.cat([grid / (torch.tensor(s.sizes) - 1), torch.zeros(len(grid), 2)], 1)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    return s, perfect, perfect @ rotation.double(), torch.zeros_like(perfect)


SMALL = metrics.Protocol(
    mig_points=3000,
    dci_train=1500,
    dci_test=800,
    sap_train=1500,
    sap_test=800,
    beta_vae_train=300,
    beta_vae_eval=200,
    factor_vae_train=300,
    factor_vae_eval=200,
    factor_vae_variance_points=2000,
)


def test_metrics_on_perfect_rotated_and_constant_codes(codes):
    s, perfect, rotated, constant = codes
    good = metrics.scalars(metrics.evaluate(perfect, s, SMALL), "")
    mixed = metrics.scalars(metrics.evaluate(rotated, s, SMALL), "")
    none = metrics.scalars(metrics.evaluate(constant, s, SMALL), "")
    assert good["mig"] > 0.97
    assert good["dci_disentanglement"] > 0.97 and good["dci_completeness"] > 0.97
    assert good["dci_informativeness"] > 0.97
    assert good["beta_vae_score"] > 0.97 and good["factor_vae_score"] > 0.97
    assert mixed["mig"] < 0.3 and mixed["dci_disentanglement"] < 0.6
    for name in ("mig", "dci_disentanglement", "dci_completeness", "sap", "factor_vae_score"):
        assert none[name] == 0, name
    assert none["beta_vae_score"] < 0.4  # chance: 1/4 of the factors


def test_metrics_do_not_depend_on_the_order_of_latents(codes):
    s, perfect, rotated, _ = codes
    order = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    for code in (perfect, rotated):
        a = metrics.scalars(metrics.evaluate(code, s, SMALL), "")
        b = metrics.scalars(metrics.evaluate(code[:, order], s, SMALL), "")
        for name in ("mig", "sap", "beta_vae_score", "factor_vae_score"):
            assert a[name] == pytest.approx(b[name], abs=1e-9), name
        for name in ("dci_disentanglement", "dci_completeness", "dci_informativeness"):
            assert a[name] == pytest.approx(b[name], abs=0.03), name  # trees break ties


def test_sap_of_a_perfect_code_of_binary_factors():
    """Each factor's own dimension predicts it exactly, every other dimension at chance (1/2 for
    a balanced binary factor): the gap, SAP, is 1/2."""
    s = space((2, 2, 2))
    grid = s.grid().double().repeat(200, 1)
    code = torch.cat([grid, torch.zeros(len(grid), 1)], 1)
    result = metrics.sap(code, grid, code, grid)
    torch.testing.assert_close(
        torch.as_tensor(result["sap_matrix"][:3]), torch.eye(3) * 0.5 + 0.5, check_dtype=False
    )
    assert result["sap"] == pytest.approx(0.5)
    assert metrics.sap(torch.zeros_like(code), grid, torch.zeros_like(code), grid)["sap"] == 0


def test_mig_is_mutual_information_over_entropy():
    """Two factors, one dimension copies factor 0, another is half factor 0 and half noise."""
    rng = np.random.default_rng(0)
    factors = rng.integers(0, 4, size=(20000, 2))
    copy = factors[:, 0].astype(float)
    result = metrics.mig(np.stack([copy, np.zeros(len(copy))], 1), factors, bins=4)
    # MI(copy; f0) = H(f0), the second dimension carries nothing: gap 1 for f0, 0 for f1
    assert result["mi_matrix"][0, 0] == pytest.approx(1.0)
    assert result["mig"] == pytest.approx(0.5, abs=1e-3)


def test_dci_lasso_agrees_on_a_perfect_code(codes):
    s, perfect, _, _ = codes
    idx = s.sample(1500, torch.Generator().manual_seed(0))
    code = perfect[s.index(idx)]
    result = metrics.dci(code, idx, code, idx, model="lasso")
    assert result["dci_disentanglement"] > 0.9 and result["dci_completeness"] > 0.9


@pytest.mark.slow  # scikit-learn's trees: about 10 s each on the protocol's 10,000 points
@pytest.mark.parametrize("kind", ["perfect", "rotated"])
def test_lightgbm_dci_is_close_to_scikit_learns_trees(kind):
    """DCI's default trees (scikit-learn's boosting grown by LightGBM: evaluation/boosting.py)
    against disentanglement_lib's (scikit-learn's GradientBoostingClassifier) on the protocol's
    10,000 / 5,000 points of synthetic codes: within 0.02 (LightGBM's own multiclass objective
    was 0.03 off on both)."""
    s = space((3, 4))
    g = torch.Generator().manual_seed(0)
    train, test = s.sample(10000, g), s.sample(5000, g)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))

    def codes(indices):
        noise = torch.randn(len(indices), 4, generator=g, dtype=torch.float64)
        code = torch.cat([indices / (torch.tensor(s.sizes) - 1), torch.zeros(len(indices), 2)], 1)
        code = code + 0.1 * noise
        return code @ rotation if kind == "rotated" else code

    x_train, x_test = codes(train), codes(test)
    ref = metrics.dci(x_train, train, x_test, test, model="gbt")
    new = metrics.dci(x_train, train, x_test, test, model="lgbm")
    for name in ("dci_disentanglement", "dci_completeness", "dci_informativeness"):
        assert new[name] == pytest.approx(ref[name], abs=0.02), name
    np.testing.assert_allclose(new["importance_matrix"].sum(0), 1.0)  # per factor, as gbt's
    if kind == "perfect":
        assert new["dci_disentanglement"] > 0.9 and new["dci_completeness"] > 0.9


def test_boosting_is_scikit_learns_with_histogram_splits():
    """Importances and predictions of vaelab's boosting against scikit-learn's on the same data,
    for two classes (one tree per stage) and five (one per class)."""
    from sklearn.ensemble import GradientBoostingClassifier

    from vaelab.evaluation.boosting import GradientBoostingClassifier as Histogram

    rng = np.random.default_rng(0)
    for classes in (2, 5):
        y = rng.integers(0, classes, 3000)
        x = np.c_[y + 0.5 * rng.standard_normal(3000), rng.standard_normal((3000, 3))]
        ref = GradientBoostingClassifier(random_state=0).fit(x, y)
        new = Histogram(max_bin=4095).fit(x, y)
        np.testing.assert_allclose(new.feature_importances_, ref.feature_importances_, atol=0.005)
        assert (new.predict(x) == ref.predict(x)).mean() > 0.99
        constant = np.zeros_like(x)  # nothing to split on: no importance, the majority class
        flat, flat_ref = Histogram().fit(constant, y), GradientBoostingClassifier().fit(constant, y)
        assert flat.feature_importances_.sum() == 0 == flat_ref.feature_importances_.sum()
        assert (flat.predict(constant) == flat_ref.predict(constant)).all()


class LinearCodes(torch.nn.Module):
    """q(z|x) = N(Wx + b, I) on 8x8 images: the representation is a known linear map."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(64, 3)

    def posterior(self, x):
        return Independent(Normal(self.net(x.flatten(1)), torch.ones(3)), 1)

    def representation(self, posterior):
        return posterior.mean


class GridOnly:
    """The two things encode_grid asks of a datamodule."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def factor_grid(self) -> torch.Tensor:
        return self.images

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255


def test_encode_grid_in_order_compiled_padded_and_in_bfloat16():
    """Every image's code in grid order, whatever the batching (700 images in batches of 256:
    the last padded to the shape compiled for), compiled or not, and bfloat16 close to it."""
    torch.manual_seed(0)
    model, cpu = LinearCodes().eval(), torch.device("cpu")
    images = torch.randint(0, 256, (700, 1, 8, 8), dtype=torch.uint8)
    data = GridOnly(images)
    with torch.no_grad():
        exact = model.net(images.float().flatten(1) / 255)
    eager = metrics.encode_grid(model, data, cpu, batch_size=256, precision="32", compile=False)
    torch.testing.assert_close(eager, exact)
    compiled = metrics.encode_grid(model, data, cpu, batch_size=256, precision="32", compile=True)
    torch.testing.assert_close(compiled, exact, rtol=1e-5, atol=1e-5)
    bf16 = metrics.encode_grid(model, data, cpu, batch_size=256, precision="bf16", compile=False)
    assert bf16.dtype == torch.float32 and bf16.shape == exact.shape
    torch.testing.assert_close(bf16, exact, rtol=0.02, atol=0.02)  # 8 bits of mantissa
    with pytest.raises(Exception, match="precision must be one of auto, 32, bf16, got 'fp8'"):
        metrics.encode_grid(model, data, cpu, precision="fp8")


def test_protocol_errors_name_the_value():
    with pytest.raises(Exception, match="'nope' is not one of mig, dci"):
        metrics.Protocol(metrics=("nope",))
    with pytest.raises(Exception, match="dci_model must be one of gbt, lgbm, lasso"):
        metrics.Protocol(dci_model="forest")
    with pytest.raises(Exception, match="grid_precision must be one of auto, 32, bf16, got '16'"):
        metrics.Protocol(grid_precision="16")
    with pytest.raises(Exception, match="eval.disentanglement_protocol has no setting 'points'"):
        metrics.protocol_from({"points": 5}, "eval.disentanglement_protocol")


# --- beta-TCVAE ------------------------------------------------------------------------------


class FixedPosteriors(LatentVariableModel):
    """q(z|x_n) = N(mu_n, sigma_n^2) for 'images' x = n (an index), p(z) = N(0, I), and a
    decoder that ignores z (log p(x|z) = 0): the objectives' rate terms alone."""

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        super().__init__()
        self.mu, self.sigma = torch.nn.Parameter(mu), torch.nn.Parameter(sigma)
        self.latent_parts = {"z": (mu.shape[1],)}
        self.image_shape = (1, 1, 1)

    def posterior(self, x):
        n = x.flatten().long()
        return Independent(Normal(self.mu[n], self.sigma[n]), 1)

    def prior(self):
        zeros = torch.zeros(self.mu.shape[1], dtype=self.mu.dtype)
        return Independent(Normal(zeros, torch.ones_like(zeros)), 1)

    def log_likelihood(self, x, z):
        return torch.zeros(z.shape[:-1], dtype=z.dtype) + 0 * z.sum(-1)


def fixed_model(n=6, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, d, generator=g, dtype=torch.float64)
    sigma = 0.3 + torch.rand(n, d, generator=g, dtype=torch.float64)
    return FixedPosteriors(mu, sigma)


def test_beta_tcvae_terms_sum_to_the_monte_carlo_kl():
    model = fixed_model(n=8, d=3)
    objective = BetaTCVAE(beta=1.0, dataset_size=8)
    x = torch.arange(8.0, dtype=torch.float64)
    torch.manual_seed(0)
    parts = objective(model, x)
    q, p = model.posterior(x), model.prior()
    torch.manual_seed(0)
    z = q.rsample()
    kl_sample = q.log_prob(z) - p.log_prob(z)
    total = parts["mi"] + parts["tc"] + parts["dim_kl"]
    torch.testing.assert_close(total, kl_sample)
    torch.testing.assert_close(parts["loss"], kl_sample.mean())  # alpha = beta = gamma = 1
    # and in expectation the closed-form KL: many draws
    many = torch.stack(
        [sum(objective(model, x)[k] for k in ("mi", "tc", "dim_kl")) for _ in range(4000)]
    )
    kl = torch.distributions.kl_divergence(q, p)
    se = many.std(0) / math.sqrt(len(many))
    assert ((many.mean(0) - kl).abs() < 5 * se).all()


def test_beta_tcvae_full_batch_estimates_are_the_exact_aggregate_posterior():
    """With the whole dataset as the batch, mss's log q(z) and log q(z_d) are the exact
    mixture densities, and mws's are offset by -log N (so its TC by (D - 1) log N)."""
    n, d = 6, 3
    model = fixed_model(n, d)
    x = torch.arange(float(n), dtype=torch.float64)
    q, p = model.posterior(x), model.prior()
    z = q.sample()
    base = Normal(model.mu.detach(), model.sigma.detach())  # (N, D) components
    per_dim = base.log_prob(z[:, None, :])  # (M, N, D)
    exact_qz = torch.logsumexp(per_dim.sum(-1), 1) - math.log(n)
    exact_marginals = (torch.logsumexp(per_dim, 1) - math.log(n)).sum(-1)
    terms = BetaTCVAE(dataset_size=n, sampling="mss").decomposition(q, p, z)
    torch.testing.assert_close(terms["log_qz"], exact_qz)
    torch.testing.assert_close(terms["log_prod_qzd"], exact_marginals)
    mws = BetaTCVAE(dataset_size=n, sampling="mws").decomposition(q, p, z)
    torch.testing.assert_close(mws["log_qz"], exact_qz - math.log(n))
    tc_mws = mws["log_qz"] - mws["log_prod_qzd"]
    torch.testing.assert_close(tc_mws, exact_qz - exact_marginals + (d - 1) * math.log(n))


def test_beta_tcvae_total_correlation_against_quadrature():
    """E_q(z)[log q(z) - log q(z_1) - log q(z_2)] of a 2-D aggregate posterior of 5 Gaussians,
    by brute-force quadrature on a grid, against the estimator over draws with the whole
    dataset in the batch; and minibatches of 4 of the 5 (stratified) come close."""
    n = 5
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(n, 2, generator=g, dtype=torch.float64) * 1.5
    mu[:, 1] += 0.8 * mu[:, 0]  # correlated: a clearly positive TC
    sigma = 0.4 + 0.3 * torch.rand(n, 2, generator=g, dtype=torch.float64)
    model = FixedPosteriors(mu, sigma)
    axis = torch.linspace(-9, 9, 1201, dtype=torch.float64)
    step = float(axis[1] - axis[0])
    za, zb = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([za, zb], -1).reshape(-1, 2)
    comp = Normal(mu, sigma)
    q_joint = torch.exp(torch.logsumexp(comp.log_prob(points[:, None]).sum(-1), 1)) / n
    q1 = torch.exp(torch.logsumexp(comp.log_prob(axis[:, None, None])[..., 0], 1)) / n
    q2 = torch.exp(torch.logsumexp(comp.log_prob(axis[:, None, None])[..., 1], 1)) / n
    q_joint = q_joint.reshape(len(axis), len(axis))
    tc_quadrature = float(
        (q_joint * (q_joint.log() - q1.log()[:, None] - q2.log()[None, :])).sum() * step**2
    )
    assert tc_quadrature > 0.05
    objective = BetaTCVAE(dataset_size=n)
    x = torch.arange(float(n), dtype=torch.float64)
    torch.manual_seed(0)
    draws = torch.cat([objective(model, x)["tc"] for _ in range(8000)])
    se = float(draws.std() / math.sqrt(len(draws)))
    assert abs(float(draws.mean()) - tc_quadrature) < 5 * se + 1e-3
    batches = torch.cat([objective(model, x[torch.randperm(n)[:4]])["tc"] for _ in range(8000)])
    assert abs(float(batches.mean()) - tc_quadrature) < 0.25 * tc_quadrature


def test_beta_tcvae_weights_and_errors():
    objective = BetaTCVAE(dataset_size=10)
    w = objective.log_weights(4, torch.device("cpu"), torch.float64).exp()
    torch.testing.assert_close(w.diagonal(), torch.full((4,), 0.1, dtype=torch.float64))
    torch.testing.assert_close(w.sum(1), torch.ones(4, dtype=torch.float64))  # q(z) of a constant
    with pytest.raises(Exception, match="dataset_size=10 is smaller than the batch"):
        objective.log_weights(11, torch.device("cpu"), torch.float64)
    with pytest.raises(Exception, match="objective.sampling must be one of mss, mws"):
        BetaTCVAE(sampling="exact")
    with pytest.raises(Exception, match="number of training images is not known"):
        BetaTCVAE()(fixed_model(), torch.arange(6.0, dtype=torch.float64))


# --- FactorVAE -------------------------------------------------------------------------------


def test_permute_dims_keeps_each_marginal_and_breaks_the_joint():
    z = torch.arange(200.0).reshape(100, 2)
    z[:, 1] = z[:, 0]
    shuffled = permute_dims(z, torch.Generator().manual_seed(0))
    for d in range(2):
        assert torch.equal(shuffled[:, d].sort().values, z[:, d].sort().values)
    assert not torch.equal(shuffled[:, 0], shuffled[:, 1])


def test_factorvae_gradients_go_to_their_own_parameters():
    """The model's gradient is that of distortion + rate + gamma * TC (the discriminator held
    fixed); the discriminator's is that of its classification loss (the codes held fixed)."""
    model = fixed_model(n=16, d=3)
    objective = FactorVAE(gamma=5.0, hidden_dims=[8, 8])
    objective.bind(model)
    objective.double()
    x = torch.arange(16.0, dtype=torch.float64)
    torch.manual_seed(0)
    parts = objective(model, x)
    parts["loss"].backward()
    got_model = model.mu.grad.clone()
    got_disc = [p.grad.clone() for p in objective.discriminator.parameters()]
    model.zero_grad()
    objective.zero_grad()
    torch.manual_seed(0)
    q = model.posterior(x)
    z = q.rsample()
    vae = (
        torch.distributions.kl_divergence(q, model.prior())
        + 5.0 * objective.discriminator(z).squeeze(-1)
    ).mean()
    want_model = torch.autograd.grad(vae, model.mu)[0]
    torch.testing.assert_close(got_model, want_model)
    torch.manual_seed(0)
    z = model.posterior(x).rsample().detach()
    real = objective.discriminator(z).squeeze(-1)
    fake = objective.discriminator(permute_dims(z)).squeeze(-1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    d_loss = 0.5 * (bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake)))
    want_disc = torch.autograd.grad(d_loss, list(objective.discriminator.parameters()))
    for got, want in zip(got_disc, want_disc, strict=True):
        torch.testing.assert_close(got, want)
    groups = objective.param_groups()
    assert groups[0]["lr"] == 1e-4 and groups[0]["betas"] == (0.5, 0.9)


def test_factorvae_discriminator_learns_a_correlated_code():
    """Codes with two copies of one dimension: the discriminator learns to tell them from their
    shuffles and its TC estimate grows positive."""
    objective = FactorVAE(hidden_dims=[32, 32], latent_dim=2)
    optimizer = torch.optim.Adam(objective.discriminator.parameters(), lr=1e-2)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    torch.manual_seed(0)
    for _ in range(300):
        u = torch.randn(128, 1)
        z = torch.cat([u, u + 0.1 * torch.randn(128, 1)], 1)
        real, fake = objective.discriminator(z), objective.discriminator(permute_dims(z))
        loss = bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    u = torch.randn(2000, 1)
    z = torch.cat([u, u + 0.1 * torch.randn(2000, 1)], 1)
    assert objective.discriminator(z).mean() > 1.0  # the TC of this code is large (~1.6 nats)


# --- end to end ------------------------------------------------------------------------------


def factor_overrides(data_dir, tmp_path) -> list[str]:
    return [
        "experiment=disentangle_beta",
        "hydra.mode=RUN",
        *SMALL_GRID,
        "data.image_size=16",
        "data.val_size=64",
        "data.source.test_size=64",
        "data.eval_batch_size=64",
        "model.encoder.channels=[8,8]",
        "model.encoder.hidden_dim=16",
        "model.latent_dim=4",
        "trainer.max_steps=12",
        "trainer.val_check_interval=6",
        "trainer.accelerator=cpu",
        "trainer.log_every_n_steps=1",
        "callbacks.progress_bar.refresh_rate=0",
        "callbacks.disentanglement.protocol={mig_points:500,dci_train:300,dci_test:100,"
        "sap_train:300,sap_test:100,beta_vae_train:30,beta_vae_eval:20,factor_vae_train:30,"
        "factor_vae_eval:20,factor_vae_variance_points:300}",
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={tmp_path}",
    ]


def grid_codes(run_dir, data_dir):
    """A trained run's codes of its data's whole factor grid, and the factors."""
    from omegaconf import OmegaConf

    from vaelab.build import build_module
    from vaelab.run import plan
    from vaelab.run.checkpoints import find_checkpoint, read_saved
    from vaelab.run.trust import Site

    saved, checkpoint = read_saved(find_checkpoint(run_dir, "last"), [])
    config = OmegaConf.create(plan.evaluation(saved, Site(run_dir, data_dir)))
    datamodule = build_datamodule(config)
    module = build_module(config, datamodule)
    module.load_state_dict(checkpoint["state_dict"])
    codes = metrics.encode_grid(module.model.eval(), datamodule, torch.device("cpu"))
    return codes, datamodule.factors


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["elbo", "beta_tcvae", "factorvae"])
def test_disentangle_preset_trains_logs_metrics_evaluates_and_resumes(objective, tmp_path, caplog):
    data_dir = tmp_path / "data"
    run_dir = tmp_path / "run"
    extra = [f"objective={objective}"]
    if objective == "factorvae":
        extra.append("objective.hidden_dims=[16,16]")
    cfg = compose_train([*factor_overrides(data_dir, tmp_path), *extra], run_dir)
    result = train_module.run(cfg)
    if objective == "beta_tcvae":
        assert {"val/mi", "val/tc", "val/dim_kl"} <= set(result)
    if objective == "factorvae":
        assert {"val/tc", "val/discriminator_accuracy"} <= set(result)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run_dir / "tensorboard").rglob("events.out.tfevents*")
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert "disentanglement/mig" in tags["scalars"]
    assert {"images/factor_mi", "images/traversals", "images/traversals_gif"} <= set(tags["images"])
    gif = accumulator.Images("images/traversals_gif")[-1].encoded_image_string
    assert gif[:6] in (b"GIF87a", b"GIF89a")
    logged = accumulator.Scalars("disentanglement/mig")[-1].value

    eval_cfg = compose_evaluate(
        [
            f"run={run_dir}",
            f"paths.data_dir={data_dir}",
            "eval.k=5",
            "eval.checkpoint=last",
            "eval.disentanglement_protocol={mig_points:500,dci_train:300,dci_test:100,"
            "sap_train:300,sap_test:100,beta_vae_train:30,beta_vae_eval:20,factor_vae_train:30,"
            "factor_vae_eval:20,factor_vae_variance_points:300}",
        ],
        output_dir=tmp_path / "evaluation",
    )
    with caplog.at_level(logging.INFO, logger="vaelab.evaluate"):
        evaluate.run(eval_cfg)
    out = tmp_path / "evaluation"
    report = json.loads((out / "metrics.json").read_text())
    assert 0 <= report["metrics"]["disentanglement/mig"] <= 1
    seconds = report["disentanglement"]["seconds_per_metric"]
    assert list(seconds) == ["encoding", "mig", "dci", "sap", "beta_vae", "factor_vae"]
    assert all(value >= 0 for value in seconds.values())
    lines = [r.getMessage() for r in caplog.records if "disentanglement:" in r.getMessage()]
    assert lines[0] == "disentanglement: encoding the grid of 864 images"
    assert lines[-1].startswith("disentanglement: factor_vae in ")
    assert lines[-1].endswith("left: none)") and "left: sap, beta_vae, factor_vae" in lines[3]
    assert report["disentanglement"]["grid_images"] == 3 * 2 * 4 * 6 * 6
    assert len(report["disentanglement"]["mi_matrix"]) == 4  # latent dims x factors
    for name in ("traversals.gif", "traversals_all.png", "factor_mi.png", "latent_pca.png"):
        assert (out / name).is_file(), name
    if objective == "beta_tcvae":  # DCI's default trees on a trained model's codes
        codes, factors = grid_codes(run_dir, data_dir)
        g = torch.Generator().manual_seed(0)
        train, test = factors.sample(600, g), factors.sample(300, g)
        x_train, x_test = codes[factors.index(train)], codes[factors.index(test)]
        ref = metrics.dci(x_train, train, x_test, test, model="gbt")
        new = metrics.dci(x_train, train, x_test, test, model="lgbm")
        for name in ("dci_disentanglement", "dci_completeness", "dci_informativeness"):
            assert new[name] == pytest.approx(ref[name], abs=0.02), name
    # last.ckpt holds the weights the callback scored when training ended: the same figures
    assert report["global_step"] == 12
    assert report["metrics"]["disentanglement/mig"] == pytest.approx(logged, abs=1e-6)
    resumed = compose_train(
        [
            *factor_overrides(data_dir, tmp_path),
            *extra,
            "trainer.max_steps=18",
            f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        ],
        tmp_path / "resumed",
    )
    train_module.run(resumed)
    last = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 18
    if objective == "factorvae":
        assert any(k.startswith("objective.discriminator.") for k in last["state_dict"])
    if objective == "beta_tcvae":
        assert int(last["state_dict"]["objective.dataset_size"]) == 3 * 2 * 4 * 6 * 6 - 64


def test_sweep_report_has_mig_columns_and_plots_mig_against_beta(tmp_path):
    from vaelab.evaluation.sweep import plot_sweep, write_tables

    rows = [
        {
            "run": f"{i}_objective.beta={beta}",
            "objective.beta": str(beta),
            "status": "ok",
            "elbo": -30.0 - beta,
            "rate": 10.0 / beta,
            "distortion": 20.0 + beta,
            "mig": 0.1 * i,
            "dci_disentanglement": 0.05 * i,
            "model_info": {"latent_dim": 10, "beta": beta, "objective": "ELBO"},
        }
        for i, beta in enumerate((1, 4, 16))
    ]
    write_tables(rows, tmp_path)
    plot_sweep(rows, tmp_path)
    header = (tmp_path / "summary.md").read_text().splitlines()[0]
    assert "| mig | dci_disentanglement |" in header
    assert (tmp_path / "mig_vs_beta.png").is_file() and (tmp_path / "rate_distortion.png").is_file()
    for row in rows:  # without factor data: no such columns, no plot
        del row["mig"], row["dci_disentanglement"]
    (tmp_path / "mig_vs_beta.png").unlink()
    write_tables(rows, tmp_path)
    plot_sweep(rows, tmp_path)
    assert "mig" not in (tmp_path / "summary.md").read_text().splitlines()[0]
    assert not (tmp_path / "mig_vs_beta.png").exists()
