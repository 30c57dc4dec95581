"""The data pipeline is keyed by global sample index: the same samples whatever the batching."""

import numpy as np
import pytest

from jaxsys.train.config import LMDataConfig, TrainConfigError
from jaxsys.train.data import BYTES_EOS, SyntheticSource, batch_for_step, make_source


def test_synthetic_samples_depend_only_on_index():
    src = SyntheticSource(vocab_size=256, seq_len=32, seed=0)
    b3 = batch_for_step(src, 3, 16)  # samples 48..63
    again = np.stack([SyntheticSource(vocab_size=256, seq_len=32, seed=0).sample(i) for i in range(48, 64)])
    np.testing.assert_array_equal(b3, again)
    assert b3.shape == (16, 33) and b3.dtype == np.int32
    assert b3.min() >= 0 and b3.max() < 256
    # every transition is one of the chain's 4 successors
    for row in b3:
        for a, b in zip(row[:-1], row[1:]):
            assert b in src.successors[a]
    other = SyntheticSource(vocab_size=256, seq_len=32, seed=1).sample(48)
    assert not np.array_equal(other, b3[0])


def test_token_files(tmp_path):
    stream = np.arange(1000, dtype=np.uint16) % 250
    stream.tofile(tmp_path / "a.bin")
    np.save(tmp_path / "b.npy", stream.astype(np.int32))
    for name, dtype in [("a.bin", "uint16"), ("b.npy", "uint16")]:
        cfg = LMDataConfig(source="tokens", paths=(str(tmp_path / name),), seq_len=16, global_batch=8,
                         micro_batches=4, token_dtype=dtype)
        src = make_source(cfg, vocab_size=256)
        windows = {tuple(src.sample(i)) for i in range(src.num_windows)}
        assert len(windows) == src.num_windows == 999 // 16  # an epoch visits every window once
        for w in windows:
            w = np.asarray(w)
            np.testing.assert_array_equal(np.diff(w) % 250, 1)  # contiguous slices of the stream
        assert not np.array_equal(src.sample(0), src.sample(src.num_windows))  # epoch 2 reshuffles
    with pytest.raises(TrainConfigError, match="outside the model's vocab_size 100"):
        make_source(LMDataConfig(source="tokens", paths=(str(tmp_path / "a.bin"),), seq_len=16), vocab_size=100)
    with pytest.raises(TrainConfigError, match="no file matches"):
        make_source(LMDataConfig(source="tokens", paths=(str(tmp_path / "none*.bin"),)), vocab_size=256)


def test_text_files_bytes_tokenizer(tmp_path):
    (tmp_path / "x.txt").write_text("hello world " * 20)
    (tmp_path / "y.txt").write_text("jax " * 30)
    cfg = LMDataConfig(source="text", paths=(str(tmp_path / "*.txt"),), seq_len=8, global_batch=4, micro_batches=2)
    src = make_source(cfg, vocab_size=257)
    toks = np.concatenate([src.sample(i) for i in range(src.num_windows)])
    assert BYTES_EOS in src.stream and set(toks) <= set(src.stream)
    with pytest.raises(TrainConfigError, match="vocab_size 256"):
        make_source(cfg, vocab_size=256)  # 256 is the separator id
