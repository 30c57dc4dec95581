"""Remaining-length prediction from the serving model's own hidden states (ARES/STAR, arXiv 2510.13668).

A decode instance that was balanced when requests arrived drifts out of balance as their output
lengths diverge. ARES predicts each running request's *remaining* length from the hidden state
the model computes anyway, with a tiny head re-applied every k decode steps (no auxiliary model,
no extra tokens), so a rescheduler (`jaxsys.serve.cluster`) can balance on future load.

    from jaxsys.serve.length import LengthDataConfig, generate_length_data, load_length_data
    run = generate_length_data(LengthDataConfig())          # resumable, cached under ~/.cache/jaxsys
    data = load_length_data(run)
    report = fit_predictors(data)                           # ours and the baselines, test MAE

Modules: `data` (generation with hidden-state capture, the cached dataset, splits by prompt),
`predictor` (our hidden-state head, the prompt-only head, per-source mean/median baselines; optax
training; MAE overall and by decode progress), `serving` (the head inside the serving loop, on
the engine's own decode hidden states every k steps), `cli` (`python -m jaxsys.serve.length.cli`).
"""

from jaxsys._lazy import lazy_exports

_LAZY = {
    "LengthData": "jaxsys.serve.length.data",
    "LengthDataConfig": "jaxsys.serve.length.data",
    "Prompt": "jaxsys.serve.length.data",
    "generate_length_data": "jaxsys.serve.length.data",
    "length_data_dir": "jaxsys.serve.length.data",
    "load_length_data": "jaxsys.serve.length.data",
    "load_prompts": "jaxsys.serve.length.data",
    "latest_run": "jaxsys.serve.length.data",
    "split_of": "jaxsys.serve.length.data",
    "LengthPredictor": "jaxsys.serve.length.predictor",
    "LengthTracker": "jaxsys.serve.length.serving",
}
__getattr__, __dir__, __all__ = lazy_exports("jaxsys.serve.length", _LAZY)
