"""Likelihoods p(x|z): decoder output (N, P*C, H, W) -> a torch.distributions object.

Each likelihood declares what it needs and accepts, and returns an `Independent` distribution
whose event is one whole image (C, H, W), so `log_prob(x)` is one number per example, in nats:

- `out_channels(c)`: the decoder's output channels for images of c channels (P * c for P
  parameters per pixel value; a likelihood that couples channels may need another count);
- `accepts`: the pixel models of the data it is a distribution over (`PIXEL_MODELS`: binary
  pixels, uniformly dequantised 8-bit values, discrete 8-bit values k/255);
- `bpd_offset(pixel_model)`: what turns its -log p(x) / D into bits per dimension on those data.

- Bernoulli: logits; for binary pixels. Its `log_prob` is torch's, summed over the image by a
  shorter route (`BernoulliImages`, one `log` per 16 pixels): the likelihood is a large part of
  a small VAE's step on a CPU (benchmarks/README.md has the figures).
- Gaussian: per-pixel mean and log-variance, as in Kingma & Welling (2013), Appendix C.2.
- GaussianFixed: per-pixel mean, one fixed standard deviation `sigma`.
- ContinuousBernoulli: Loaiza-Ganem & Cunningham (2019), a normalised density on [0, 1].
- DiscretizedLogistic / DiscretizedGaussian / DiscretizedLogisticMixture: probabilities of the
  256 values of 8-bit data (Salimans et al. 2017), bits per dimension without dequantisation.
"""

from vaelab.likelihoods.base import (
    IMAGE_EVENT_DIMS,
    PIXEL_MODELS,
    Likelihood,
    at_least_float32,
    bounded,
    log_ndtr,
    soft_floor,
)
from vaelab.likelihoods.continuous import (
    Bernoulli,
    BernoulliImages,
    ContinuousBernoulli,
    Gaussian,
    GaussianFixed,
    _BernoulliLogProbSum,
    bernoulli_log_prob_sum,
)
from vaelab.likelihoods.discretised import (
    Discretized,
    DiscretizedGaussian,
    DiscretizedImages,
    DiscretizedLogistic,
    DiscretizedLogisticMixture,
)

__all__ = [
    "IMAGE_EVENT_DIMS",
    "PIXEL_MODELS",
    "Bernoulli",
    "BernoulliImages",
    "ContinuousBernoulli",
    "Discretized",
    "DiscretizedGaussian",
    "DiscretizedImages",
    "DiscretizedLogistic",
    "DiscretizedLogisticMixture",
    "Gaussian",
    "GaussianFixed",
    "Likelihood",
    "_BernoulliLogProbSum",
    "at_least_float32",
    "bernoulli_log_prob_sum",
    "bounded",
    "log_ndtr",
    "soft_floor",
]
