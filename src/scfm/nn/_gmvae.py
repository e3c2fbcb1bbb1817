"""Variational cell latents of CellPLM: a plain Gaussian VAE and a Gaussian-mixture VAE.

Both map the (normalised) encoder output ``h`` of each cell to the cell embedding. Attribute
names mirror the CellPLM checkpoint (``hid_2mu``, ``inference.inference_qyx.0.logits``, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GMVAELatent", "VAELatent", "gumbel_noise"]

#: Floors of the Gumbel transform ``-log(-log(u + eps) + eps)`` (reference values).
GUMBEL_EPS = 1e-20
#: Hidden width of q(z | h, y); hard-coded in the reference.
QZYX_HIDDEN = 512


def gumbel_noise(uniform: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from uniform samples, exactly as the reference transforms them."""
    return -torch.log(-torch.log(uniform + GUMBEL_EPS) + GUMBEL_EPS)


def _log_normal(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    var = var + 1e-8
    return -0.5 * torch.sum(math.log(2.0 * math.pi) + torch.log(var) + (x - mu) ** 2 / var, dim=-1)


class VAELatent(nn.Module):
    """Gaussian latent (``latent_mod='vae'``): the embedding is the posterior mean.

    Parameters
    ----------
    d_in
        Width of the encoder output.
    d_latent
        Latent width (``post_latent_dim``).
    kl_floor
        Free-bits floor: the KL term counts only once it exceeds this value.
    """

    def __init__(self, d_in: int, d_latent: int, kl_floor: float = 1.0) -> None:
        super().__init__()
        self.hid_2mu = nn.Linear(d_in, d_latent)
        self.hid_2sigma = nn.Linear(d_in, d_latent)
        self.kl_floor = kl_floor

    def forward(self, h: torch.Tensor, **_: object) -> dict[str, torch.Tensor]:
        """Posterior mean (eval) or a reparameterised sample (training) of each cell."""
        mu = self.hid_2mu(h)
        logvar = self.hid_2sigma(h).clamp(-5.0, 5.0)
        var = logvar.exp() + 1e-4
        z = mu + var.sqrt() * torch.randn_like(mu) if self.training else mu
        return {"z": z, "qz_mean": mu, "qz_var": var}

    def loss(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """KL(q(z|h) || N(0, I)) averaged over cells, zero while below ``kl_floor``."""
        mu, var = out["qz_mean"], out["qz_var"]
        kl = 0.5 * torch.sum(mu**2 + var - torch.log(var) - 1.0, dim=-1).mean()
        return kl if kl.item() >= self.kl_floor else kl * 0.0


class _GumbelSoftmax(nn.Module):
    """q(y | h): cluster logits (``inference_qyx.0.logits`` in the checkpoint)."""

    def __init__(self, d_in: int, n_clusters: int) -> None:
        super().__init__()
        self.logits = nn.Linear(d_in, n_clusters)


class _Gaussian(nn.Module):
    """Mean and variance heads of q(z | h, y) (``inference_qzyx.2.mu`` / ``.var``)."""

    def __init__(self, d_in: int, d_latent: int) -> None:
        super().__init__()
        self.mu = nn.Linear(d_in, d_latent)
        self.var = nn.Linear(d_in, d_latent)


class _GMVAEInference(nn.Module):
    def __init__(self, d_in: int, d_latent: int, n_clusters: int) -> None:
        super().__init__()
        self.inference_qyx = nn.ModuleList([_GumbelSoftmax(d_in, n_clusters)])
        self.inference_qzyx = nn.ModuleList(
            [nn.Linear(d_in + n_clusters, QZYX_HIDDEN), nn.ReLU(), _Gaussian(QZYX_HIDDEN, d_latent)]
        )
        self.y_mu = nn.Linear(n_clusters, d_latent)
        self.y_var = nn.Linear(n_clusters, d_latent)


class GMVAELatent(nn.Module):
    """Gaussian-mixture latent (``latent_mod='gmvae'``) :cite:p:`Dilokthanakul2016`.

    A cell first picks a cluster ``y`` from q(y|h) (Gumbel-softmax), then its embedding is the
    mean of q(z|h, y). In eval mode ``y`` is a hard one-hot: the most probable cluster when
    ``noise`` is ``None`` (deterministic), otherwise ``argmax(logits + noise)`` (the reference
    samples the noise from the global torch RNG).

    Parameters
    ----------
    d_in
        Width of the encoder output.
    d_latent
        Latent width (``post_latent_dim``).
    n_clusters
        Mixture components (``num_clusters``).
    floor
        Free-bits floor of both loss terms (``lamda``).
    w_li, w_en
        Weights of the Gaussian (likelihood) and the cluster-entropy terms.
    """

    def __init__(
        self,
        d_in: int,
        d_latent: int,
        n_clusters: int,
        floor: float = 5.0,
        w_li: float = 5.0,
        w_en: float = 5.0,
    ) -> None:
        super().__init__()
        self.inference = _GMVAEInference(d_in, d_latent, n_clusters)
        self.n_clusters = n_clusters
        self.floor, self.w_li, self.w_en = floor, w_li, w_en

    def forward(
        self, h: torch.Tensor, noise: torch.Tensor | None = None, **_: object
    ) -> dict[str, torch.Tensor]:
        """Latent of each cell.

        Parameters
        ----------
        h
            ``[N, d_in]``.
        noise
            ``[N, n_clusters]`` Gumbel noise added to the logits; ``None``: fresh noise in
            training, zero (most probable cluster) in eval.
        """
        inf = self.inference
        logits = inf.inference_qyx[0].logits(h)
        if noise is None:
            noise = gumbel_noise(torch.rand_like(logits)) if self.training else None
        scores = logits if noise is None else logits + noise
        if self.training:
            y = torch.softmax(scores, dim=-1)  # temperature 1
        else:
            y = F.one_hot(scores.argmax(dim=-1), self.n_clusters).to(h.dtype)
        t = inf.inference_qzyx[1](inf.inference_qzyx[0](torch.cat([h, y], dim=-1)))
        gauss = inf.inference_qzyx[2]
        mu = gauss.mu(t)
        var = F.softplus(gauss.var(t))
        z = mu + torch.sqrt(var + 1e-10) * torch.randn_like(mu) if self.training else mu
        return {
            "z": z,
            "qz_mean": mu,
            "qz_var": var,
            "cluster_logits": logits,
            "cluster": y,
            "prior_mean": inf.y_mu(y),
            "prior_var": F.softplus(inf.y_var(y)),
        }

    def loss(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """``w_li * max(floor, KL-like Gaussian term) + w_en * max(floor, log K - H(q(y|h)))``."""
        gauss = (
            _log_normal(out["z"], out["qz_mean"], out["qz_var"])
            - _log_normal(out["z"], out["prior_mean"], out["prior_var"])
        ).mean()
        log_q = torch.log_softmax(out["cluster_logits"], dim=-1)
        entropy = -(log_q.exp() * log_q).sum(dim=-1).mean()
        cat = math.log(self.n_clusters) - entropy
        floor = torch.as_tensor(self.floor, dtype=gauss.dtype, device=gauss.device)
        return self.w_li * torch.maximum(floor, gauss) + self.w_en * torch.maximum(floor, cat)
