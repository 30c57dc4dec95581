"""Length data (issue 18 B): the capture loop against a cache-free forward of the same model,
resumption, the split by prompt, the prompt loader on the real shared data."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from graphcot_helpers import smollm2_tokenizer

from jaxsys.serve.length import data as ld

TEXTS = ["What is two plus two?", "Name a colour.", "Write a haiku about the sea.", "Why is the sky blue?",
         "Count to five."]


def _prompts(n: int = len(TEXTS)) -> list[ld.Prompt]:
    return [ld.Prompt(f"gsm8k:{i}", "gsm8k", TEXTS[i]) for i in range(n)]


def _cfg(**kw) -> ld.LengthDataConfig:
    base = dict(model="tiny", prompts={"gsm8k": 5}, seeds=2, max_new_tokens=16, max_prompt_tokens=64,
                capture_every=3, hidden_layer=2, slots=3, temperature=0.0)
    return ld.LengthDataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    """A tiny random 3-layer model over SmolLM2's vocabulary and tokenizer, drawn at unit scale
    (matrices ~ N(0, 1/fan_in)) with numpy, so that greedy choices have clear margins."""
    import jax.numpy as jnp

    from jaxsys.models import LoadedModel, ModelConfig
    from jaxsys.models.decoder import param_shapes

    tok = smollm2_tokenizer()
    cfg = ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=1024,
                      eos_token_ids=tuple(tok.eos_token_ids))
    rng = np.random.default_rng(5)

    def draw(path, shape):
        name = path[-1].key
        if "norm" in name:
            return 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
        fan_in = {"wo": cfg.num_heads * cfg.head_dim, "w_down": cfg.intermediate_size, "embed": 1}.get(
            name, cfg.hidden_size)
        return rng.standard_normal(shape, np.float32) / np.sqrt(fan_in)

    import jax

    params = jax.tree_util.tree_map_with_path(lambda p, s: jnp.asarray(draw(p, s)), param_shapes(cfg),
                                              is_leaf=lambda s: isinstance(s, tuple))
    return LoadedModel(name="tiny-3layer", config=cfg, params=params, tokenizer=tok, path=Path("tiny"))


REF_T = 128  # the reference runs one padded shape (trailing padding is harmless: causal)


@functools.lru_cache(maxsize=None)
def _jit_forward():
    import jax

    from jaxsys.models import decoder

    return jax.jit(decoder.forward, static_argnames=("cfg", "return_hidden"))


def _reference(model, prompt_ids: list[int], out_ids: list[int], layer: int):
    """Cache-free forwards over prompt + output: logits, final-norm hidden and the layer-`layer`
    residual of the model truncated to `layer` layers (RMS-normalised, unit gain), at every position."""
    import jax
    import jax.numpy as jnp

    cfg = model.config
    seq = prompt_ids + out_ids
    assert len(seq) <= REF_T
    ids = np.zeros((1, REF_T), np.int32)
    ids[0, :len(seq)] = seq
    logits, _, h_final = _jit_forward()(model.params, ids, cfg=cfg, return_hidden=True)
    truncated = {**model.params, "layers": jax.tree.map(lambda a: a[:layer], model.params["layers"]),
                 "final_norm": jnp.ones_like(model.params["final_norm"])}
    _, _, h_layer = _jit_forward()(truncated, ids, cfg=cfg.replace(num_layers=layer), return_hidden=True)
    return np.asarray(logits[0]), np.asarray(h_final[0]), np.asarray(h_layer[0])


def test_greedy_capture_matches_cache_free_forward(model, tmp_path):
    """Slots are refilled mid-run (5 prompts x 2 seeds on 3 slots); every generation's tokens are the
    greedy continuation and every captured hidden state is the reference's at position prompt_len - 1 + g."""
    cfg = _cfg()
    root = ld.generate_length_data(cfg, out_dir=tmp_path, model=model, prompts=_prompts(), progress=False)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["hidden_layer"] == 2 and "decoder.forward(return_hidden=True)" in manifest["provenance"]
    tok = model.tokenizer
    files = sorted((root / "gens").glob("*.npz"))
    assert len(files) == 10
    for f in files:
        pi = int(f.name[:5])
        prompt_ids = tok.encode_chat([{"role": "user", "content": TEXTS[pi]}])
        with np.load(f) as z:
            out = z["token_ids"].tolist()
            g, h_layer, h_final = z["g"], z["hidden_layer"], z["hidden_final"]
            reason = str(z["finish_reason"])
        assert 1 <= len(out) <= cfg.max_new_tokens
        assert reason == ("length" if len(out) == cfg.max_new_tokens else "stop")
        logits, ref_final, ref_layer = _reference(model, prompt_ids, out, layer=cfg.hidden_layer)
        P = len(prompt_ids)
        np.testing.assert_array_equal(np.argmax(logits[P - 1:P - 1 + len(out)], -1), out)
        assert g[0] == 0 and np.all(np.diff(g) > 0) and g[-1] <= len(out)
        assert np.all(np.diff(g[1:]) == cfg.capture_every)  # every k steps of the request's own decoding
        np.testing.assert_allclose(h_final, ref_final[P - 1 + g], rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(h_layer, ref_layer[P - 1 + g], rtol=2e-3, atol=2e-3)


def test_sampled_tokens_do_not_depend_on_the_batch(model, tmp_path):
    cfg = _cfg(temperature=0.8, top_p=0.9, seeds=1)
    a = ld.generate_length_data(cfg.model_copy(update={"slots": 1}), out_dir=tmp_path / "a", model=model,
                                prompts=_prompts(3), progress=False)
    b = ld.generate_length_data(cfg.model_copy(update={"slots": 3}), out_dir=tmp_path / "b", model=model,
                                prompts=_prompts(3), progress=False)
    for f in sorted((a / "gens").glob("*.npz")):
        with np.load(f) as x, np.load(b / "gens" / f.name) as y:
            np.testing.assert_array_equal(x["token_ids"], y["token_ids"])


def test_resume_and_load(model, tmp_path, capsys):
    cfg = _cfg()
    root = ld.generate_length_data(cfg, out_dir=tmp_path, model=model, prompts=_prompts(), limit=4, progress=False)
    first = {f.name: f.stat().st_mtime_ns for f in (root / "gens").glob("*.npz")}
    assert len(first) == 4
    ld.generate_length_data(cfg, out_dir=tmp_path, model=model, prompts=_prompts(), progress=False)
    after = {f.name: f.stat().st_mtime_ns for f in (root / "gens").glob("*.npz")}
    assert len(after) == 10 and all(after[k] == v for k, v in first.items())  # finished ones not redone
    data = ld.load_length_data(root)
    assert data.num_gens == 10 and data.hidden_layer.shape == (len(data.g), model.config.hidden_size)
    np.testing.assert_array_equal(data.remaining, data.gen_len[data.gen] - data.g)
    assert data.prompt_features.shape == (5, 4 * model.config.hidden_size)
    assert {ld.SPLITS[s] for s in data.prompt_split} <= set(ld.SPLITS)
    from jaxsys.serve.length import cli

    assert cli.main(["show", str(root)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["generations"] == 10 and shown["prompts"] == 5
    with pytest.raises(ValueError, match="another configuration"):
        ld.generate_length_data(cfg.model_copy(update={"capture_every": 4}), out_dir=tmp_path, model=model,
                                prompts=_prompts(), progress=False)


def test_split_is_by_prompt_and_stable():
    keys = [f"gsm8k:{i}" for i in range(3000)]
    splits = [ld.split_of(k) for k in keys]
    assert splits == [ld.split_of(k) for k in keys]
    frac = {s: splits.count(s) / len(splits) for s in ld.SPLITS}
    assert abs(frac["train"] - 0.7) < 0.04 and abs(frac["test"] - 0.15) < 0.03


def test_load_prompts_interleaves_sources(shared_data):
    prompts = ld.load_prompts({"gsm8k": 20, "mt_bench": 10, "grbench": 10}, data_dir=shared_data, seed=1)
    assert [p.source for p in prompts].count("mt_bench") == 10 and len({p.key for p in prompts}) == 40
    assert {p.source for p in prompts[:8]} == set(ld.SOURCES)
    assert prompts == ld.load_prompts({"gsm8k": 20, "mt_bench": 10, "grbench": 10}, data_dir=shared_data, seed=1)
    with pytest.raises(ValueError, match="has 80"):
        ld.load_prompts({"mt_bench": 81}, data_dir=shared_data)
    with pytest.raises(ValueError, match="unknown prompt source"):
        ld.LengthDataConfig(prompts={"alpaca": 3})


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="shared data folder"):
        ld.load_prompts({"gsm8k": 1}, data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        ld.load_length_data(tmp_path)
