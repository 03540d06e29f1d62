"""Train the three VAE likelihoods and InfoMax on the 8x8 digits; print the quality table.

For every model: held-out ELBO per image (analytic KL, 16 draws), the IWAE bound (k draws),
and the linear-probe accuracy of the encoder mean μ(x) (logistic regression on frozen,
standardised features; train split -> test split). Reference rows: raw pixels, and an
untrained InfoMax encoder (same architecture, same seed). Figures go to ``--out``.

ELBO/IWAE are log-densities of different data: the Bernoulli rows score the binarised
images (a probability mass, ≤ 0), the Gaussian rows the [0, 1] grey levels (a density, which
may be positive). Compare within a likelihood, not across.

Choices (InfoMax settings, training length) are made with ``--validation``: the last 287 of
a fixed permutation of the 1,437 training images are held out and play the test split's part
(the models train on the other 1,150), so the test split is never read while choosing.

    python scripts/vae_digits.py [--vae-steps 3000] [--infomax-steps 3000] [--latent-dim 8]
                                 [--k 1000] [--seed 0] [--out runs/vae_digits]
                                 [--validation] [--infomax-set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from jointkl.inference import SVI
from jointkl.models import VAE, InfoMax

from jointkl.bounds import elbo_per_datum, iwae_per_datum
from jointkl.data.digits import digits
from jointkl.probe import linear_probe_accuracy
from jointkl.vae_plots import latent_scatter, reconstruction_grid, sample_grid

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian-learned-scale")
VALIDATION_SEED, VALIDATION_SIZE = 12345, 287  # 20 % of the 1,437 training images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vae-steps", type=int, default=3000)
    ap.add_argument("--infomax-steps", type=int, default=3000)
    ap.add_argument("--latent-dim", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--k", type=int, default=1000, help="importance samples of the IWAE bound")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/vae_digits")
    ap.add_argument(
        "--models",
        default=",".join([*LIKELIHOODS, "infomax"]),
        help="comma-separated subset of: " + ", ".join([*LIKELIHOODS, "infomax"]),
    )
    ap.add_argument(
        "--validation",
        action="store_true",
        help="hold out 287 training images as the evaluation split; never read the test split",
    )
    ap.add_argument(
        "--infomax-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an InfoMax constructor setting (repeatable), e.g. estimator=nce",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    L, B = args.latent_dim, args.batch_size
    grey_tr, y_tr = digits("train")
    bin_tr = digits("train", binarize=True)[0]
    if args.validation:
        # A fixed split of the training images; the test split stays unread.
        perm = torch.from_numpy(np.random.RandomState(VALIDATION_SEED).permutation(len(y_tr)))
        val, fit_part = perm[:VALIDATION_SIZE], perm[VALIDATION_SIZE:]
        grey_te, y_te, bin_te = grey_tr[val], y_tr[val], bin_tr[val]
        grey_tr, y_tr, bin_tr = grey_tr[fit_part], y_tr[fit_part], bin_tr[fit_part]
    else:
        grey_te, y_te = digits("test")
        bin_te = digits("test", binarize=True)[0]
    infomax_settings = dict(_setting(kv) for kv in args.infomax_set)
    rows = []

    def report(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    report(
        {
            "model": "raw pixels (reference)",
            "dim": 64,
            "probe_acc": linear_probe_accuracy(grey_tr, y_tr, grey_te, y_te),
        }
    )
    chosen = set(args.models.split(","))
    for likelihood in (lk for lk in LIKELIHOODS if lk in chosen):
        x_tr, x_te = (bin_tr, bin_te) if likelihood == "bernoulli" else (grey_tr, grey_te)
        vae = VAE(L, likelihood=likelihood)
        t0 = time.perf_counter()
        fit = SVI(
            loss="meanfield", lr=1e-3, steps=args.vae_steps, batch_size=B, seed=args.seed
        ).fit(vae, x_tr)
        seconds = time.perf_counter() - t0
        elbo = elbo_per_datum(vae.model, vae.guide, x_te, num_samples=16, seed=args.seed)
        iwae = iwae_per_datum(vae.model, vae.guide, x_te, k=args.k, seed=args.seed)
        probe = linear_probe_accuracy(vae.encode(x_tr)[0], y_tr, vae.encode(x_te)[0], y_te)
        tag = likelihood.replace("gaussian-learned-scale", "learned")
        reconstruction_grid(vae, x_te, out / f"vae-{tag}-reconstructions.png")
        sample_grid(vae, out / f"vae-{tag}-samples.png", seed=args.seed)
        latent_scatter(
            vae.encode(x_te)[0],
            out / f"vae-{tag}-latent.png",
            labels=y_te,
            title=f"VAE ({likelihood}) μ(x), test digits",
        )
        row = {
            "model": f"VAE {likelihood}",
            "dim": L,
            "heldout_elbo": round(float(elbo.mean()), 2),
            "heldout_iwae": round(float(iwae.mean()), 2),
            "iwae_k": args.k,
            "probe_acc": probe,
            "train_loss_per_image": round(fit.history[-1] / len(x_tr), 2),
            "seconds": round(seconds, 1),
        }
        if vae.obs_scale is not None:
            row["learned_scale"] = round(float(vae.obs_scale().detach()), 4)
        report(row)

    if "infomax" in chosen:
        infomax_rows(args, infomax_settings, grey_tr, y_tr, grey_te, y_te, out, report)
    table(rows, out, "validation (287 held-out training images)" if args.validation else "test")


def _setting(kv: str) -> tuple[str, object]:
    key, sep, value = kv.partition("=")
    if not sep:
        raise SystemExit(f"--infomax-set wants KEY=VALUE, got {kv!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string such as nce


def infomax_rows(args, settings, grey_tr, y_tr, grey_te, y_te, out: Path, report) -> None:
    L, B = args.latent_dim, args.batch_size
    torch.manual_seed(args.seed)
    untrained = InfoMax(L, **settings)
    untrained._check(grey_tr)  # build the networks: the seed's initialisation, never trained
    report(
        {
            "model": "InfoMax encoder, untrained (reference)",
            "dim": L,
            "probe_acc": linear_probe_accuracy(
                untrained.encode(grey_tr), y_tr, untrained.encode(grey_te), y_te
            ),
        }
    )
    infomax = InfoMax(L, **settings)
    t0 = time.perf_counter()
    SVI(loss=infomax.loss, lr=1e-3, steps=args.infomax_steps, batch_size=B, seed=args.seed).fit(
        infomax, grey_tr
    )
    seconds = time.perf_counter() - t0
    latent_scatter(
        infomax.encode(grey_te),
        out / "infomax-latent.png",
        labels=y_te,
        title="InfoMax μ(x), test digits",
    )
    report(
        {
            "model": (
                f"InfoMax ({infomax.estimator}, hidden {list(infomax.hidden)}, global "
                f"{infomax.global_weight}, local {infomax.local_weight}, prior "
                f"{infomax.prior_weight})"
            ),
            "dim": L,
            "probe_acc": linear_probe_accuracy(
                infomax.encode(grey_tr), y_tr, infomax.encode(grey_te), y_te
            ),
            "heldout_mi_js": round(infomax.mutual_information(grey_te, seed=args.seed), 3),
            "seconds": round(seconds, 1),
        }
    )


def table(rows: list[dict], out: Path, split: str) -> None:
    print(f"\nevaluated on the {split} split")
    print("| model | dim | held-out ELBO | IWAE (k) | probe acc. |")
    print("|---|---|---|---|---|")
    for r in rows:
        elbo = f"{r['heldout_elbo']:.2f}" if "heldout_elbo" in r else "–"
        iwae = f"{r['heldout_iwae']:.2f} ({r['iwae_k']})" if "heldout_iwae" in r else "–"
        print(f"| {r['model']} | {r['dim']} | {elbo} | {iwae} | {r['probe_acc']:.3f} |")
    print(f"\nfigures: {out}/")


if __name__ == "__main__":
    main()
