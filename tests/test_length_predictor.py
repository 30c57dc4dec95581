"""Length predictors (issue 18 C) on small synthetic data whose answer is known: the decode hidden
state encodes the remaining length, the prompt features only the prompt's typical length."""

from __future__ import annotations

import numpy as np
import pytest

from jaxsys.serve.length import data as ld
from jaxsys.serve.length import predictor as lp

MAX_NEW = 256
D = 12


def synthetic_data(seed: int = 0, prompts: int = 90, seeds: int = 3, k: int = 8) -> ld.LengthData:
    """Each prompt has a typical length (by source, times a per-prompt factor); each generation's
    length scatters around it. hidden_layer = a fixed projection of (remaining, g) plus noise;
    hidden_final = noise; prompt features = a projection of the prompt's typical length plus noise."""
    rng = np.random.default_rng(seed)
    proj_h = rng.standard_normal((2, D))
    proj_p = rng.standard_normal((1, 4 * D))
    base = {0: 60, 1: 150, 2: 30}
    cols = {"gen": [], "g": [], "remaining": [], "hl": [], "hf": []}
    gen_prompt, gen_len, keys, source, split, plen, feats = [], [], [], [], [], [], []
    for p in range(prompts):
        s = p % 3
        typical = base[s] * rng.uniform(0.5, 1.5)
        keys.append(f"{ld.SOURCES[s]}:{p}")
        source.append(s)
        split.append(ld.SPLITS.index(ld.split_of(keys[-1])))
        plen.append(int(rng.integers(20, 80)))
        feats.append((np.array([[typical / MAX_NEW]]) @ proj_p)[0] + 0.05 * rng.standard_normal(4 * D))
        for _ in range(seeds):
            n = int(np.clip(rng.gamma(2.0, typical / 2.0), 1, MAX_NEW))
            g = np.arange(0, n + 1, k)
            gi = len(gen_len)
            gen_prompt.append(p)
            gen_len.append(n)
            rem = n - g
            z = np.stack([rem / MAX_NEW, g / MAX_NEW], 1)
            cols["gen"].append(np.full(len(g), gi))
            cols["g"].append(g)
            cols["remaining"].append(rem)
            cols["hl"].append(z @ proj_h + 0.02 * rng.standard_normal((len(g), D)))
            cols["hf"].append(rng.standard_normal((len(g), D)))
    gen_len_a = np.array(gen_len, np.int32)
    return ld.LengthData(
        gen=np.concatenate(cols["gen"]).astype(np.int32), g=np.concatenate(cols["g"]).astype(np.int32),
        remaining=np.concatenate(cols["remaining"]).astype(np.int32),
        hidden_layer=np.concatenate(cols["hl"]).astype(np.float32),
        hidden_final=np.concatenate(cols["hf"]).astype(np.float32),
        gen_prompt=np.array(gen_prompt, np.int32), gen_len=gen_len_a, gen_truncated=gen_len_a >= MAX_NEW,
        prompt_keys=keys, prompt_source=np.array(source, np.int32), prompt_split=np.array(split, np.int32),
        prompt_len=np.array(plen, np.int32), prompt_features=np.stack(feats).astype(np.float32),
        max_new_tokens=MAX_NEW, hidden_layer_index=1, manifest={})


SMALL_HEADS = (
    lp.HeadSpec("ours_layer", "hidden_layer", widths=(16,), learning_rates=(3e-3,), epochs=25, batch_size=64),
    lp.HeadSpec("ours_final", "hidden_final", widths=(16,), learning_rates=(3e-3,), epochs=25, batch_size=64),
    lp.HeadSpec("prompt_progress", "prompt", widths=(64,), learning_rates=(3e-3,), epochs=25, batch_size=64),
    lp.HeadSpec("prompt_total", "prompt", widths=(64,), learning_rates=(3e-3,), epochs=25, batch_size=64,
                progress=False),
)


@pytest.fixture(scope="module")
def report():
    return lp.fit_predictors(synthetic_data(), SMALL_HEADS, progress=False)


def test_hidden_head_reads_remaining_length(report):
    rows = report.rows
    ours = rows["ours_layer"]["test"]["mae"]
    prompt = rows[report.best(["prompt_progress", "prompt_total"])]["test"]["mae"]
    assert ours < 0.5 * prompt, (ours, prompt)
    # the noise-only hidden state carries nothing beyond g: no better than the per-source statistics
    assert rows["ours_final"]["test"]["mae"] > 0.8 * rows["source_median_given_g"]["test"]["mae"]
    assert rows["ours_layer"]["params"] == (D + 2) * 16 + 16 + 16 + 1
    assert rows["prompt_total"]["params"] == 4 * D * 64 + 64 + 64 + 1
    for name, row in rows.items():
        t = row["test"]
        assert t["n"] == int((synthetic_data().sample_split() == ld.SPLITS.index("test")).sum())
        assert set(t["by_source"]) == set(ld.SOURCES) and "0-0" in t["by_g"], name


def test_breakdown_is_consistent(report):
    """The per-bucket MAEs average back to the overall MAE (weighted by bucket sizes)."""
    data = synthetic_data()
    test = data.sample_split() == ld.SPLITS.index("test")
    pred = report.predictors["ours_layer"]
    err = np.abs(pred.predict_features(data.hidden_layer[test], data.g[test]) - data.remaining[test])
    row = report.rows["ours_layer"]["test"]
    assert row["mae"] == pytest.approx(float(err.mean()), rel=1e-5)
    g = data.g[test]
    sizes = [((g >= lo) & (g < hi)).sum() for lo, hi in lp.G_BUCKETS if ((g >= lo) & (g < hi)).any()]
    assert np.average(list(row["by_g"].values()), weights=sizes) == pytest.approx(row["mae"], rel=1e-5)


def test_predictions_are_clipped_and_roundtrip(report, tmp_path):
    data = synthetic_data()
    for name in ("ours_layer", "prompt_total"):
        pred = report.predictors[name]
        x = data.hidden_layer if pred.inputs == "hidden_layer" else data.prompt_features[data.gen_prompt[data.gen]]
        g = np.full(len(x), MAX_NEW - 3)
        out = pred.predict_features(x * 50, g)  # far outside the training range
        assert np.all(out >= 0) and np.all(out <= 3)
        pred.save(tmp_path / f"{name}.npz")
        again = lp.LengthPredictor.load(tmp_path / f"{name}.npz")
        np.testing.assert_allclose(again.predict_features(x[:50], data.g[:50]),
                                   pred.predict_features(x[:50], data.g[:50]), rtol=1e-6)
        assert again.num_params == pred.num_params and again.hidden_layer == 1


def test_bad_input_and_untrained():
    data = synthetic_data(prompts=12, seeds=1)
    untrained = lp.LengthPredictor("x", "hidden_layer", True, MAX_NEW)
    assert not untrained.trained and untrained.num_params == 0
    with pytest.raises(lp.UntrainedPredictorError):
        untrained.predict_hidden(data.hidden_layer[:2], data.g[:2])
    with pytest.raises(lp.UntrainedPredictorError):
        untrained.save("unused.npz")
    trained, _ = lp.train_head(data, SMALL_HEADS[0])
    with pytest.raises(ValueError, match="takes 12 input features"):
        trained.predict_hidden(np.zeros((2, 7)), np.zeros(2))
    with pytest.raises(ValueError, match="expected features"):
        trained.predict_hidden(np.zeros((2, 12)), np.zeros(3))
    prompt_head = lp.LengthPredictor("p", "prompt", True, MAX_NEW)
    with pytest.raises(ValueError, match="not decode hidden states"):
        prompt_head.predict_hidden(np.zeros((1, 12)), np.zeros(1))


def test_smoothing_in_training_matches_serving():
    """predict_data smooths each generation's hidden states in order exactly as a server calling
    smooth() every k steps would; the dev-chosen smoothing is recorded and saved."""
    data = synthetic_data(prompts=24, seeds=2)
    spec = lp.HeadSpec("ours_layer", "hidden_layer", widths=(16,), learning_rates=(3e-3,), emas=(0.0, 0.8),
                       epochs=5, batch_size=64)
    pred, grid = lp.train_head(data, spec)
    assert len(grid) == 2 and pred.ema in (0.0, 0.8)
    pred.ema = 0.8
    gen = data.gen[0]
    rows = np.nonzero(data.gen == gen)[0]
    rows = rows[np.argsort(data.g[rows])]
    state, served = None, []
    for r in rows:
        state = pred.smooth(state, data.hidden_layer[r:r + 1])
        served.append(pred.predict_hidden(state, data.g[r:r + 1])[0])
    mask = np.zeros(len(data.g), bool)
    mask[rows] = True
    got = pred.predict_data(data, mask)  # in row order of the mask, which is g order here
    np.testing.assert_allclose(got, served, rtol=1e-5, atol=1e-4)


def test_serving_batch_sizes_share_one_program_per_bucket(report):
    """The head pads its rows to a power of two: a server predicting for 5, 6, 7 and 8 running
    requests compiles one program, and padding changes no prediction."""
    from jaxsys.serve.cluster.validation import CompileWatch

    data = synthetic_data()
    pred = report.predictors["ours_layer"]
    x, g = data.hidden_layer[:8], data.g[:8]
    with CompileWatch() as watch:
        outs = [pred.predict_hidden(x[:n], g[:n]) for n in (5, 6, 7, 8)]
    assert watch.count <= 1
    for out in outs:
        np.testing.assert_allclose(out, outs[-1][:len(out)], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(pred.predict_hidden(x[:1], g[:1]), outs[-1][:1], rtol=1e-5, atol=1e-3)
