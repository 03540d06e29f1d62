"""Benchmark: the EM Laplace factor of the default ``jointkl fit bmm --engine em`` run, with
the Bernoulli tables' matmul form (the default) against the family's broadcast tables (the
previous path), side by side in one process. One JSON object on stdout:

    {"case": "bmm/em", "matmul_s": .., "broadcast_s": .., "ratio": broadcast_s / matmul_s,
     "cov_max_abs_diff": .., "cov_max_abs": ..}

    OMP_NUM_THREADS=1 python scripts/bench/em_laplace.py
"""

from __future__ import annotations

import importlib
import json
import os
import time

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

from jointkl.engine import engine_class  # noqa: E402
from jointkl.zoo import model_class  # noqa: E402

laplace_module = importlib.import_module("jointkl.inference.em.laplace")


def main() -> None:
    """Fit the default BMM with EM, then time its Laplace factor both ways."""
    pair = model_class("bmm")()
    engine_kw = {**getattr(pair, "engine_defaults", {}).get("em", {}), "progress": False}
    args, kwargs = pair.default_data(seed=0)
    torch.manual_seed(0)
    fit = engine_class("em")(**engine_kw).fit(pair, *args, **kwargs)
    t0 = time.perf_counter()
    new = laplace_module.laplace(fit)["factor"]
    t1 = time.perf_counter()
    fit.state.pop("laplace:factor")
    matmul_groups = laplace_module._bernoulli_matmul_groups
    laplace_module._bernoulli_matmul_groups = lambda fm, theta: []
    try:
        t2 = time.perf_counter()
        old = laplace_module.laplace(fit)["factor"]
        t3 = time.perf_counter()
    finally:
        laplace_module._bernoulli_matmul_groups = matmul_groups
    cov_new, cov_old = new @ new.T, old @ old.T
    print(
        json.dumps(
            {
                "case": "bmm/em",
                "matmul_s": round(t1 - t0, 3),
                "broadcast_s": round(t3 - t2, 3),
                "ratio": round((t3 - t2) / (t1 - t0), 1),
                "cov_max_abs_diff": float((cov_new - cov_old).abs().max()),
                "cov_max_abs": float(cov_old.abs().max()),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
