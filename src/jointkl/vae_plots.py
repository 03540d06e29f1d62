"""Pictures of a fitted auto-encoder: image grids and the latent space, as PNG files.

* :func:`image_grid` — rows of images (data, reconstructions, prior samples);
* :func:`latent_scatter` — the encoder means in 2-D (the first two principal components
  when L > 2), coloured by label when labels are given;
* :func:`vae_figures` / :func:`infomax_figures` — what ``jointkl diagnose`` draws for these
  models (the models' ``diagnostic_plots`` hooks call them).

Files are written atomically (rendered to memory, then renamed into place); matplotlib runs
on its non-interactive Agg backend.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from jointkl.errors import InputError  # noqa: E402
from jointkl.runs import atomic_write_bytes  # noqa: E402

__all__ = [
    "image_grid",
    "latent_scatter",
    "reconstruction_grid",
    "sample_grid",
    "vae_figures",
    "infomax_figures",
]


def _save(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(buf.getvalue(), Path(path))


def _image_shape(d: int, image_shape: Sequence[int] | None) -> tuple[int, int]:
    if image_shape is not None:
        h, w = (int(s) for s in image_shape)
        if h * w != d:
            raise InputError(f"image_shape {tuple(image_shape)} does not hold {d} pixels")
        return h, w
    side = math.isqrt(d)
    if side * side != d:
        raise InputError(f"{d} pixels is not a square image: pass image_shape=(H, W)")
    return side, side


def image_grid(
    rows: Sequence[torch.Tensor],
    path: str | Path,
    image_shape: Sequence[int] | None = None,
    row_titles: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Rows of grey images, each row a ``(n, H·W)`` tensor in [0, 1] (clipped), as one PNG."""
    if not rows:
        raise InputError("image_grid: no rows to draw")
    d = rows[0].shape[-1]
    h, w = _image_shape(d, image_shape)
    ncols = max(len(r) for r in rows)
    fig, axes = plt.subplots(
        len(rows), ncols, figsize=(0.7 * ncols + 0.8, 0.75 * len(rows) + 0.4), squeeze=False
    )
    for i, row in enumerate(rows):
        imgs = row.detach().cpu().double().clamp(0, 1).reshape(-1, h, w).numpy()
        for j in range(ncols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(imgs):
                ax.imshow(imgs[j], cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        if row_titles:
            axes[i, 0].set_ylabel(row_titles[i], rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def reconstruction_grid(vae, x: torch.Tensor, path: str | Path, n: int = 12) -> Path:
    """Data (top) and the VAE's reconstructions E[x | z = μ(x)] (bottom), ``n`` columns."""
    x = x[:n]
    return image_grid(
        [x, vae.reconstruct(x)],
        path,
        vae.image_shape,
        row_titles=["data", "recon."],
        title=f"VAE ({vae.likelihood}) reconstructions",
    )


def sample_grid(vae, path: str | Path, n: int = 36, seed: int = 0) -> Path:
    """Decoder means E[x | z] for ``n`` draws z ~ N(0, I), in rows of 12."""
    s = vae.sample(n, seed=seed)
    rows = [s[i : i + 12] for i in range(0, n, 12)]
    return image_grid(
        rows, path, vae.image_shape, title=f"VAE ({vae.likelihood}) samples from the prior"
    )


def _two_d(features: torch.Tensor) -> tuple[np.ndarray, str]:
    f = features.detach().cpu().double()
    if f.shape[1] == 1:
        return torch.cat([f, torch.zeros_like(f)], 1).numpy(), "z"
    if f.shape[1] == 2:
        return f.numpy(), "z"
    # PCA by SVD of the centred features: the two directions of largest spread.
    fc = f - f.mean(0)
    _, _, v = torch.linalg.svd(fc, full_matrices=False)
    return (fc @ v[:2].T).numpy(), "PC"


def latent_scatter(
    features: torch.Tensor,
    path: str | Path,
    labels: Any = None,
    title: str = "latent means",
) -> Path:
    """Scatter of ``(N, L)`` features in 2-D (PCA when L > 2), coloured by ``labels``."""
    if features.dim() != 2 or len(features) == 0:
        raise InputError(f"latent_scatter: features must be (N, L), got {tuple(features.shape)}")
    xy, axis = _two_d(features)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.5)
    else:
        lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=lab, s=4, alpha=0.7, cmap="tab10")
        ax.legend(*sc.legend_elements(), fontsize=7, loc="best", markerscale=0.8)
    ax.set_xlabel(f"{axis} 1")
    ax.set_ylabel(f"{axis} 2")
    ax.set_title(title)
    return _save(fig, path)


def _activated(model, fit) -> torch.Tensor:
    """Load ``fit``'s weights into ``model``'s networks; returns the training data."""
    from jointkl.engine import engine_class

    engine_class(fit.engine).activate(fit)
    if not fit.args or not isinstance(fit.args[0], torch.Tensor):
        raise InputError("this fit holds no data tensor as its first argument: nothing to draw")
    x = fit.args[0]
    return x.reshape(x.shape[0], -1)


def vae_figures(vae, fit, out_dir: str | Path) -> list[Path]:
    """``reconstructions.png``, ``samples.png`` and ``latent.png`` for a fitted VAE."""
    out = Path(out_dir)
    x = _activated(vae, fit)
    return [
        reconstruction_grid(vae, x, out / "reconstructions.png"),
        sample_grid(vae, out / "samples.png"),
        latent_scatter(vae.encode(x)[0], out / "latent.png", title="VAE latent means μ(x)"),
    ]


def infomax_figures(infomax, fit, out_dir: str | Path) -> list[Path]:
    """``latent.png``: the InfoMax representation μ(x) of the training data."""
    x = _activated(infomax, fit)
    return [
        latent_scatter(
            infomax.encode(x), Path(out_dir) / "latent.png", title="InfoMax representation μ(x)"
        )
    ]
