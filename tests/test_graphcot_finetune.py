"""Part D's pieces: the masked-prompt objective of `jaxsys.train`, the SFT rows built from oracle
traces (prompts as the engine serves them, read back by the trainer's token source), a short
fine-tune through `jaxsys.train.sft` that learns the completions, and the exported model keeping
the chat format the agents are served in (the export itself: tests/test_models_hf_export.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

pytest.importorskip("RestrictedPython")

from graphcot_helpers import small_graph, smollm2_tokenizer, tiny_text_model  # noqa: E402

from jaxsys.models import decoder  # noqa: E402
from jaxsys.models.config import ModelConfig  # noqa: E402
from jaxsys.serve.graphcot import prompts  # noqa: E402
from jaxsys.serve.graphcot.backends import encode_segments  # noqa: E402
from jaxsys.serve.graphcot.prompts import messages  # noqa: E402
from jaxsys.serve.graphcot.questions import generate_questions, split  # noqa: E402
from jaxsys.serve.graphcot.sandbox import Sandbox  # noqa: E402
from jaxsys.serve.graphcot.sft import end_of_turn_id, pack_rows, seq_len_for, sft_examples, write_rows  # noqa: E402


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    return small_graph(tmp_path_factory.mktemp("g"))


@pytest.fixture(scope="module")
def examples(graph):
    qs = split(generate_questions(graph, per_template=2, seed=0), "train")
    with Sandbox(graph) as sb:
        out, wrong = sft_examples(graph, qs, smollm2_tokenizer(), sandbox=sb)
    assert wrong == {"glm": 0, "graphcot": 0}
    return out


def test_masked_tokens_carry_no_loss_and_read_as_themselves():
    from jaxsys.train.objective import input_ids, lm_loss_sum

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    params = decoder.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (3, 17)).astype(np.int32)
    masked = rng.random((3, 17)) < 0.5
    encoded = np.where(masked, -tokens - 1, tokens)
    np.testing.assert_array_equal(input_ids(encoded), tokens)
    assert int(input_ids(np.int32(-1))) == 0  # padding reads as token 0, as before
    logits, _ = decoder.forward(params, tokens[:, :-1], cfg=cfg)
    nll = jax.nn.logsumexp(logits, -1) - np.take_along_axis(np.asarray(logits), tokens[:, 1:, None], -1)[..., 0]
    want = float(np.sum(np.where(masked[:, 1:], 0.0, nll)))
    got = float(lm_loss_sum(params, encoded, None, cfg=cfg, dropout=0.0))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_examples_are_the_served_prompts_and_the_oracle_completions(graph, examples):
    tok = smollm2_tokenizer()
    eot = end_of_turn_id(tok)
    assert tok.decode([eot], skip_special_tokens=False) == "<|im_end|>"  # what SmolLM2's template closes a turn with
    assert {e.agent for e in examples["glm"]} >= {"c", "a", "r"}
    assert {e.agent for e in examples["graphcot"]} == {"graphcot-thought", "graphcot-action"}
    # one question's calls, replayed: each example's prompt renders to the chat the engine is sent
    from jaxsys.serve.graphcot.oracle import run_oracle

    q = split(generate_questions(graph, per_template=2, seed=0), "train")[0]
    _, calls = run_oracle("graphcot", graph, q)
    mine = [e for e in examples["graphcot"] if e.qid == q["qid"]]
    assert len(mine) == len(calls)
    for e, (call, completion) in zip(mine, calls):
        assert tok.decode(e.prompt_ids, skip_special_tokens=False) == tok.apply_chat_template(messages(call.segments))
        assert e.completion_ids[-1] == eot and tok.decode(e.completion_ids[:-1]) == completion


def test_rows_read_back_through_the_trainer_source(tmp_path, examples):
    from jaxsys.train.config import LMDataConfig
    from jaxsys.train.data import make_source
    from jaxsys.train.program import target_count

    exs = examples["glm"]
    seq_len = seq_len_for(exs, cap=4096, coverage=1.0)
    assert seq_len >= max(len(e) for e in exs) and seq_len // 2 < max(len(e) for e in exs)
    assert seq_len_for(exs, cap=4096, coverage=0.01) <= seq_len_for(exs, cap=4096) <= seq_len
    assert seq_len_for(exs, cap=64, coverage=1.0) == 64
    rows, dropped = pack_rows(exs, seq_len)
    assert dropped == 0 and rows.shape == (len(exs), seq_len)
    e, row = exs[0], rows[0]
    p, n = len(e.prompt_ids), len(e)
    np.testing.assert_array_equal(row[:p], -np.asarray(e.prompt_ids) - 1)
    np.testing.assert_array_equal(row[p:n], e.completion_ids)
    assert (row[n:] == -1).all()
    short, dropped = pack_rows(exs, min(len(x) for x in exs))
    assert dropped == sum(len(x) > min(len(x) for x in exs) for x in exs) and len(short) == len(exs) - dropped

    path = write_rows(tmp_path / "rows.npy", rows)
    src = make_source(LMDataConfig(source="tokens", paths=(str(path),), seq_len=seq_len, global_batch=1,
                                   micro_batches=1), vocab_size=49152)
    assert src.num_windows == len(rows)
    windows = np.stack([src.sample(i) for i in range(src.num_windows)])
    order = [int(np.flatnonzero((rows == w[:-1]).all(1))[0]) for w in windows]
    assert sorted(order) == list(range(len(rows)))  # an epoch visits every row once
    assert (windows[:, -1] < 0).all()  # the token past a row is masked: no loss crosses rows
    np.testing.assert_array_equal(target_count(windows), [len(exs[i].completion_ids) for i in order])


@pytest.mark.slow  # a 12-step fine-tune: over a minute on 2 cores
def test_finetune_through_the_trainer_learns_the_completions(tmp_path, examples):
    from jaxsys.train.sft import finetune

    model = tiny_text_model()
    exs = [e for e in examples["glm"] if e.agent == "c"]  # short prompts: a fast test
    seq_len = seq_len_for(exs, cap=1024)
    rows, _ = pack_rows(exs, seq_len)
    path = write_rows(tmp_path / "rows.npy", rows)
    params, record = finetune(model.params, model.config, path, seq_len=seq_len, batch=2, steps=12,
                                    lr=1e-2, warmup_steps=1, seed=0)
    losses = record["losses"]
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0]
    assert record["tokens"] == 12 * 2 * seq_len
    per_row = {tuple(r): len(e.completion_ids) for r, e in zip(rows, exs)}
    assert record["loss_tokens"] <= 24 * max(per_row.values()) and record["loss_tokens"] >= 24
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params, model.params)
    assert all(jax.tree.leaves(changed))  # a full fine-tune from the given weights


def test_exported_model_keeps_the_served_chat_format(tmp_path):
    import jaxsys
    from jaxsys.models.hf_export import save_hf_folder

    model = tiny_text_model()
    loaded = jaxsys.load_model(save_hf_folder(tmp_path / "m", model.params, model.config, model.tokenizer))
    segments = prompts.r_prompt(prompts.glm_system("a small book graph"), "Who wrote Emma?", {}, [], sharing=True)
    assert encode_segments(loaded.tokenizer, segments) == encode_segments(model.tokenizer, segments)
    assert end_of_turn_id(loaded.tokenizer) == end_of_turn_id(model.tokenizer)
    assert set(loaded.config.eos_token_ids) == set(model.config.eos_token_ids)
