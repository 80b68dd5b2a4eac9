"""Gaussian approximations of a dataset and their closed-form denoisers.

For data ``x0 ~ N(mu, Sigma)`` the noisy marginal is ``N(mu, Sigma + sigma^2 I)`` and the optimal
denoiser is linear:

    D(x, sigma) = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu).

With the eigendecomposition ``Sigma = V diag(lam) V^T`` it acts on each eigendirection separately
(factor ``lam / (lam + sigma^2)``), and the probability-flow ODE has the closed-form solution

    x(s) = mu + V diag(sqrt((lam + s^2) / (lam + s0^2))) V^T (x(s0) - mu).

:class:`GaussianDenoiser` stores ``Sigma`` as ``k`` eigenpairs plus an isotropic variance for the
orthogonal complement, ``Sigma = V_k diag(lam_k) V_k^T + iso_var (I - V_k V_k^T)``, which covers

* full rank (k = dim): the Gaussian with the data's mean and covariance;
* low rank + isotropic: the top-k principal directions and, for the rest, the average of the
  remaining eigenvalues (probabilistic PCA's maximum-likelihood fit);
* isotropic (k = 0): ``N(mu, iso_var I)``, the same as a one-component
  :class:`~diffsampler.models.gmm.GaussianMixture`.

Computed in float64 (float32 on MPS) without forming a dim x dim matrix when k < dim.  These are
:class:`~diffsampler.models.base.Denoiser` objects, so ``sample()`` and
:func:`~diffsampler.analysis.record_trajectories` take them like any model.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..models.base import EDM_SIGMA_MAX, EDM_SIGMA_MIN, Denoiser


class GaussianDenoiser(Denoiser):
    """Optimal denoiser of ``N(mean, V diag(eigvals) V^T + iso_var (I - V V^T))``.

    Args:
        mean: (*shape) the data mean (its shape is the sample shape).
        eigvals: (k,) non-negative variances along the rows of ``eigvecs``.
        eigvecs: (k, dim) orthonormal rows (dim = mean.numel()).
        iso_var: variance in every direction orthogonal to ``eigvecs`` (ignored when k = dim).
    """

    def __init__(self, mean: torch.Tensor, eigvals: torch.Tensor, eigvecs: torch.Tensor, iso_var: float = 0.0,
                 sigma_min: float = EDM_SIGMA_MIN, sigma_max: float = EDM_SIGMA_MAX):
        mean = torch.as_tensor(mean, dtype=torch.float64)
        self.shape = tuple(mean.shape)
        self.mean = mean.reshape(-1)
        dim = self.mean.numel()
        self.eigvals = torch.as_tensor(eigvals, dtype=torch.float64).reshape(-1)
        self.eigvecs = torch.as_tensor(eigvecs, dtype=torch.float64).reshape(-1, dim) if self.eigvals.numel() \
            else torch.zeros(0, dim, dtype=torch.float64)
        k = self.eigvals.numel()
        if self.eigvecs.shape != (k, dim):
            raise ValueError(f"eigvecs must be ({k}, {dim}) for {k} eigenvalues and a mean of {dim} values, "
                             f"got {tuple(self.eigvecs.shape)}")
        if k > dim:
            raise ValueError(f"at most {dim} eigenpairs in dimension {dim}, got {k}")
        if bool((self.eigvals < 0).any()) or iso_var < 0:
            raise ValueError("variances must be non-negative")
        gram = self.eigvecs @ self.eigvecs.T
        if k and not torch.allclose(gram, torch.eye(k, dtype=torch.float64), atol=1e-6):
            raise ValueError("eigvecs must have orthonormal rows")
        self.iso_var = float(iso_var) if k < dim else 0.0
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def from_covariance(cls, mean: torch.Tensor, cov: torch.Tensor, **kwargs) -> "GaussianDenoiser":
        """Full rank: ``N(mean, cov)`` for a symmetric positive semi-definite (dim, dim) ``cov``."""
        cov = torch.as_tensor(cov, dtype=torch.float64)
        dim = torch.as_tensor(mean).numel()
        if cov.shape != (dim, dim):
            raise ValueError(f"cov must be ({dim}, {dim}), got {tuple(cov.shape)}")
        evals, evecs = torch.linalg.eigh(0.5 * (cov + cov.T))
        return cls(mean, evals.clamp_min(0), evecs.T, **kwargs)

    @classmethod
    def fit(cls, images: torch.Tensor, rank: Optional[int] = None, **kwargs) -> "GaussianDenoiser":
        """The Gaussian approximation of a dataset ``images`` (N, *shape).

        ``rank=None``: full-rank mean and covariance (maximum likelihood, divided by N).
        ``rank=k``: the top-k principal directions with their variances plus, for the other
        directions, the average of the remaining eigenvalues (isotropic; k=0: ``N(mean, v I)`` with
        v the average per-pixel variance).
        """
        x = torch.as_tensor(images).to(torch.float64)
        n = x.shape[0]
        if n < 2:
            raise ValueError("need at least 2 samples to fit a Gaussian")
        flat = x.reshape(n, -1)
        dim = flat.shape[1]
        mean = flat.mean(0)
        xc = flat - mean
        if dim <= n:
            evals, evecs = torch.linalg.eigh(xc.T @ xc / n)
            evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1).T             # rows = components
        else:                                                                       # n < dim: via the Gram matrix
            g_evals, u = torch.linalg.eigh(xc @ xc.T / n)
            g_evals, u = g_evals.flip(0).clamp_min(0), u.flip(1)
            keep = g_evals > g_evals[0] * 1e-12
            evecs = (xc.T @ u[:, keep] / (n * g_evals[keep]).sqrt()).T
            evals = g_evals[keep]
        total = float(xc.square().sum() / n)                                        # trace of the covariance
        if rank is None:                                        # (rank-deficient data: variance 0 off its span)
            return cls(mean.reshape(x.shape[1:]), evals, evecs, iso_var=0.0, **kwargs)
        rank = int(rank)
        if not 0 <= rank <= dim:
            raise ValueError(f"rank must be between 0 and {dim}, got {rank}")
        rank = min(rank, evecs.shape[0])
        rest = dim - rank
        iso = (total - float(evals[:rank].sum())) / rest if rest else 0.0
        return cls(mean.reshape(x.shape[1:]), evals[:rank], evecs[:rank], iso_var=max(iso, 0.0), **kwargs)

    # -- model interface -------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.mean.numel()

    @property
    def rank(self) -> int:
        return self.eigvals.numel()

    def to(self, device) -> "GaussianDenoiser":
        self.mean, self.eigvals, self.eigvecs = (t.to(device) for t in (self.mean, self.eigvals, self.eigvecs))
        return self

    def _dtype(self, device) -> torch.dtype:
        return torch.float32 if torch.device(device).type == "mps" else torch.float64

    def _params(self, device):
        dtype = self._dtype(device)
        return self.mean.to(device, dtype), self.eigvals.to(device, dtype), self.eigvecs.to(device, dtype)

    def _apply(self, r: torch.Tensor, factor_eig: torch.Tensor, factor_iso: torch.Tensor, v: torch.Tensor):
        """``V diag(factor_eig) V^T r + factor_iso (r - V V^T r)`` for r (B, dim), factors per sample."""
        proj = r @ v.T                                                              # (B, k)
        out = (proj * factor_eig) @ v
        if self.rank < self.dim:
            out = out + factor_iso[:, None] * (r - proj @ v)
        return out

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        mu, lam, v = self._params(x.device)
        flat = x.reshape(x.shape[0], -1).to(mu.dtype)
        s2 = torch.as_tensor(sigma, dtype=mu.dtype, device=x.device).reshape(-1).expand(x.shape[0]) ** 2
        r = flat - mu
        f_eig = torch.where(lam[None] + s2[:, None] > 0, lam[None] / (lam[None] + s2[:, None]), torch.ones_like(s2[:, None]))
        f_iso = torch.where(self.iso_var + s2 > 0, self.iso_var / (self.iso_var + s2), torch.ones_like(s2))
        return (mu + self._apply(r, f_eig, f_iso, v)).reshape(x.shape).to(x.dtype)

    def exact_flow(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """The exact ODE solution from ``x`` at ``sigma_from`` to ``sigma_to`` (float64)."""
        mu, lam, v = self._params(x.device)
        flat = x.reshape(x.shape[0], -1).to(mu.dtype)
        f_eig = ((lam + sigma_to ** 2) / (lam + sigma_from ** 2)).sqrt()[None].expand(flat.shape[0], -1)
        f_iso = torch.full((flat.shape[0],), math.sqrt((self.iso_var + sigma_to ** 2) / (self.iso_var + sigma_from ** 2)),
                           dtype=mu.dtype, device=x.device)
        return (mu + self._apply(flat - mu, f_eig, f_iso, v)).reshape(x.shape)

    def covariance(self) -> torch.Tensor:
        """The (dim, dim) data covariance (forms the full matrix: for tests and small dims)."""
        v = self.eigvecs
        cov = v.T @ torch.diag(self.eigvals) @ v
        if self.rank < self.dim:
            cov = cov + self.iso_var * (torch.eye(self.dim, dtype=cov.dtype, device=cov.device) - v.T @ v)
        return cov

    def log_prob(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Log density of the noisy marginal ``N(mean, Sigma + sigma^2 I)`` at x (B, *shape) -> (B,)."""
        mu, lam, v = self._params(x.device)
        r = x.reshape(x.shape[0], -1).to(mu.dtype) - mu
        s2 = float(sigma) ** 2
        proj = r @ v.T
        quad = (proj.square() / (lam + s2)).sum(-1)
        logdet = torch.log(lam + s2).sum()
        rest = self.dim - self.rank
        if rest:
            quad = quad + (r.square().sum(-1) - proj.square().sum(-1)) / (self.iso_var + s2)
            logdet = logdet + rest * math.log(self.iso_var + s2)
        return -0.5 * (quad + logdet + self.dim * math.log(2 * math.pi))

    def __repr__(self) -> str:
        return f"GaussianDenoiser(shape={self.shape}, rank={self.rank}, iso_var={self.iso_var:.4g})"
