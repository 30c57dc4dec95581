"""A length head for the serving tests: fixed random weights, saved and loaded as the CLI's
`train` leaves it (the serving path does not care how a head was trained)."""

from __future__ import annotations

import numpy as np


def fixed_head(model, folder, inputs: str, layer: int | None, *, max_new_tokens: int = 16, ema: float = 0.5):
    from jaxsys.serve.length.predictor import LengthPredictor

    D = model.config.hidden_size
    rng = np.random.default_rng(0)
    head = LengthPredictor(name="ours_layer", inputs=inputs, progress=True, max_new_tokens=max_new_tokens,
                           params=[(rng.standard_normal((D + 2, 8)).astype(np.float32) / np.sqrt(D),
                                    np.zeros(8, np.float32)),
                                   (rng.standard_normal((8, 1)).astype(np.float32), np.full(1, 0.5, np.float32))],
                           x_mean=np.zeros(D + 2, np.float32), x_std=np.ones(D + 2, np.float32),
                           hidden_layer=layer, ema=ema)
    head.save(folder / "predictor.npz")
    return LengthPredictor.load(folder / "predictor.npz")
