"""Weight loading: clear errors for every way a checkpoint can be wrong, and GGUF dequantization.

GGUF files are written with `gguf.GGUFWriter`. F32/F16/Q8_0/Q4_0/Q4_1 tensors are quantized with
`gguf.quants.quantize`; its Python quantizer does not implement the K-quants (Q4_K, Q6_K raise
NotImplementedError), so those are tested on hand-made blocks against an independent numpy
transcription of llama.cpp's `dequantize_row_q4_K` / `dequantize_row_q6_K`. Q8_0 and Q4_1 (the real
SmolLM2 file's quantized types) are also checked on the real file against independent formulas.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import hf_logits, hf_model, our_logits, random_ids, smollm2_path, torch_threads
from jaxsys.models import ModelNotFoundError, load_model, registry, weights
from jaxsys.models.config import ConfigError
from jaxsys.models.weights import WeightError

MODEL_ATOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A saved tiny Llama (fresh copies are made per test by `broken_folder`)."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    hf_model("llama", seed=0).save_pretrained(folder)
    return folder


@pytest.fixture
def broken_folder(hf_folder, tmp_path):
    """Returns edit(fn): copy of the tiny Llama whose tensors dict `fn` mutates."""
    def edit(fn):
        tensors = load_file(hf_folder / "model.safetensors")
        fn(tensors)
        (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())
        save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
        return tmp_path
    return edit


# ---------------------------------------------------------------------- HF folders

def test_missing_folder(tmp_path):
    with pytest.raises(WeightError, match="no config.json"):
        weights.load_hf_folder(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        load_model(tmp_path / "nope")


def test_missing_config_json(hf_folder, tmp_path):
    (tmp_path / "model.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes())
    with pytest.raises(WeightError, match=r"no config\.json in .*" + tmp_path.name):
        weights.load_hf_folder(tmp_path)


def test_missing_weights_file(hf_folder, tmp_path):
    (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())
    with pytest.raises(WeightError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        weights.load_hf_folder(tmp_path)


def test_index_names_missing_shard(hf_folder, tmp_path):
    (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightError, match="model-00001-of-00002.safetensors"):
        weights.load_hf_folder(tmp_path)


@pytest.mark.parametrize("model_type", ["gpt_neox", "phi3"])
def test_unsupported_architecture_is_named(hf_folder, tmp_path, model_type):
    cfg = json.loads((hf_folder / "config.json").read_text())
    cfg["model_type"] = model_type
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=f"model_type='{model_type}'") as e:
        weights.load_hf_folder(tmp_path)
    assert "llama" in str(e.value)  # lists what is supported


def test_unsupported_activation_is_named(hf_folder, tmp_path):
    cfg = json.loads((hf_folder / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'gelu'"):
        weights.load_hf_folder(tmp_path)


def test_missing_tensor_is_named(broken_folder):
    folder = broken_folder(lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightError, match=r"lacks tensors .*layers\.1\.w_up"):
        weights.load_hf_folder(folder)


def test_unexpected_tensor_is_named(broken_folder):
    folder = broken_folder(lambda t: t.update({"model.layers.0.mystery.weight": np.zeros(4, np.float32)}))
    with pytest.raises(WeightError, match="model.layers.0.mystery.weight"):
        weights.load_hf_folder(folder)


def test_layer_out_of_range_is_named(broken_folder):
    folder = broken_folder(lambda t: t.update({"model.layers.5.input_layernorm.weight": np.ones(32, np.float32)}))
    with pytest.raises(WeightError, match=r"model\.layers\.5\.input_layernorm\.weight.*layer 5.*2 layers"):
        weights.load_hf_folder(folder)


@pytest.mark.parametrize("name,bad_shape,want_shape", [
    ("model.norm.weight", (31,), (32,)),
    ("model.embed_tokens.weight", (95, 32), (96, 32)),
    ("model.layers.0.mlp.gate_proj.weight", (40, 32), (48, 32)),
    ("model.layers.0.self_attn.q_proj.weight", (16, 32), (32, 32)),
])
def test_wrong_shape_names_tensor_and_both_shapes(broken_folder, name, bad_shape, want_shape):
    folder = broken_folder(lambda t: t.update({name: np.zeros(bad_shape, np.float32)}))
    with pytest.raises(WeightError) as e:
        weights.load_hf_folder(folder)
    msg = str(e.value)
    assert name in msg
    assert str(bad_shape) in msg  # the shape as it is in the file
    assert str(want_shape) in msg or str(want_shape[::-1]) in msg  # what the config wants


# ---------------------------------------------------------------------- registry / load_model

def test_unknown_registry_name_lists_known_names():
    with pytest.raises(ModelNotFoundError) as e:
        registry.resolve("no-such-model-7b")
    assert "no-such-model-7b" in str(e.value)
    for name in registry.REGISTRY:
        assert name in str(e.value)


def test_load_model_folder_without_weights(tmp_path):
    with pytest.raises(WeightError, match="neither config.json nor exactly one .gguf"):
        load_model(tmp_path)


def test_load_model_rejects_other_files(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(WeightError, match=r"expected a \.gguf file"):
        load_model(f)


# ---------------------------------------------------------------------- GGUF

def test_gguf_missing_and_corrupt(tmp_path):
    with pytest.raises(WeightError, match="GGUF file not found"):
        weights.read_gguf(tmp_path / "absent.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 4)
    with pytest.raises(WeightError, match="cannot read .*bad.gguf as GGUF"):
        weights.read_gguf(bad)


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's Q/K row permutation (rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_llama_gguf(path, hf, types: dict[str, str], extra: dict[str, tuple[np.ndarray, str]] = ()):
    """Convert a tiny HF Llama to GGUF as llama.cpp does, quantizing tensor `name` with types[name]
    (default F32). Returns {gguf name: dequantized HF-layout weight}."""
    import gguf

    c = hf.config
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    part = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for hf_part, g in part.items():
            names[f"model.layers.{i}.{hf_part}.weight"] = f"blk.{i}.{g}.weight"
    dequantized = {}
    for hf_name, g_name in names.items():
        x = sd[hf_name].astype(np.float32)
        qtype = gguf.GGMLQuantizationType[types.get(g_name, "F32")]
        q = gguf.quants.quantize(x, qtype)
        dequantized[g_name] = gguf.quants.dequantize(q, qtype).reshape(x.shape)
        if g_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = c.num_attention_heads if "attn_q" in g_name else c.num_key_value_heads
            q = _llama_permute(q, heads)  # rows permute; quantization blocks lie within rows
        w.add_tensor(g_name, q, raw_dtype=qtype if q.dtype == np.uint8 else None)
    for g_name, (q, qtype) in dict(extra).items():
        w.add_tensor(g_name, q, raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dequantized


MIXED_TYPES = {
    "token_embd.weight": "Q8_0", "output.weight": "Q8_0", "output_norm.weight": "F32",
    "blk.0.attn_q.weight": "Q4_0", "blk.0.attn_k.weight": "Q4_1", "blk.0.attn_v.weight": "F16",
    "blk.0.attn_output.weight": "Q8_0", "blk.0.ffn_gate.weight": "Q4_1", "blk.0.ffn_up.weight": "Q4_0",
    "blk.0.ffn_down.weight": "F16",
    "blk.1.attn_q.weight": "Q8_0", "blk.1.attn_k.weight": "F16", "blk.1.attn_v.weight": "Q4_1",
    "blk.1.attn_output.weight": "Q4_0", "blk.1.ffn_gate.weight": "F16", "blk.1.ffn_up.weight": "Q8_0",
    "blk.1.ffn_down.weight": "F32",
}


def test_gguf_supported_types_load_and_match_hf(tmp_path):
    """A tiny Llama converted to GGUF with mixed F32/F16/Q8_0/Q4_0/Q4_1 tensors (Q/K rows permuted the
    llama.cpp way) loads to exactly the dequantized weights, and its logits equal HF's model holding
    those same dequantized weights."""
    import gguf
    import torch

    hf = hf_model("llama", seed=40, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2)
    path = tmp_path / "tiny.gguf"
    deq = _write_llama_gguf(path, hf, MIXED_TYPES)
    reader = gguf.GGUFReader(str(path))
    got_types = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors}
    assert {got_types[n] for n in MIXED_TYPES} == {"F32", "F16", "Q8_0", "Q4_0", "Q4_1"}

    cfg, params, meta = weights.load_gguf(path)
    assert meta["general.architecture"] == "llama"
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (64, 2, 4, 2)
    assert not cfg.tie_word_embeddings
    D, Hq, Hkv, Dh = 64, 4, 2, 16
    np.testing.assert_array_equal(params["embed"], deq["token_embd.weight"])
    np.testing.assert_array_equal(params["lm_head"], deq["output.weight"].T)
    for i in range(2):
        L = params["layers"]
        np.testing.assert_array_equal(L["wq"][i], deq[f"blk.{i}.attn_q.weight"].T.reshape(D, Hq, Dh))
        np.testing.assert_array_equal(L["wk"][i], deq[f"blk.{i}.attn_k.weight"].T.reshape(D, Hkv, Dh))
        np.testing.assert_array_equal(L["wv"][i], deq[f"blk.{i}.attn_v.weight"].T.reshape(D, Hkv, Dh))
        np.testing.assert_array_equal(L["wo"][i], deq[f"blk.{i}.attn_output.weight"].T.reshape(Hq, Dh, D))
        np.testing.assert_array_equal(L["w_down"][i], deq[f"blk.{i}.ffn_down.weight"].T)

    # the HF model with the same (quantized-then-dequantized) weights gives the same logits
    inverse = {v: k for k, v in {
        "model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
        "model.norm.weight": "output_norm.weight"}.items()}
    sd = hf.state_dict()
    with torch.no_grad():
        for g_name, x in deq.items():
            if g_name in inverse:
                hf_name = inverse[g_name]
            else:
                i, part = g_name.split(".")[1], g_name.split(".")[2]
                hf_part = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                           "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                           "ffn_down": "mlp.down_proj"}[part]
                hf_name = f"model.layers.{i}.{hf_part}.weight"
            sd[hf_name].copy_(torch.from_numpy(np.ascontiguousarray(x)))
    ids = random_ids((1, 12), seed=41)
    ours = our_logits(weights.to_device(params, cfg), cfg, ids)
    ref = hf_logits(hf, ids)
    assert np.max(np.abs(ours - ref)) <= MODEL_ATOL


@pytest.mark.parametrize("qtype", ["Q5_0", "Q2_K"])
def test_gguf_unsupported_quantization_is_named(tmp_path, qtype):
    import gguf

    hf = hf_model("llama", seed=42, hidden_size=64, intermediate_size=96)
    if qtype == "Q5_0":  # gguf can quantize Q5_0: put it on a real model tensor
        path = tmp_path / "q5.gguf"
        _write_llama_gguf(path, hf, {"blk.1.ffn_up.weight": "Q5_0"})
        bad = "blk.1.ffn_up.weight"
    else:  # gguf cannot quantize Q2_K: add one raw block (84 bytes = 256 values) of zeros
        path = tmp_path / "q2k.gguf"
        bad = "blk.0.extra_q2k.weight"
        _write_llama_gguf(path, hf, {}, extra={bad: (np.zeros((1, 84), np.uint8), "Q2_K")})
        assert gguf.GGMLQuantizationType.Q2_K.name not in weights.SUPPORTED_GGUF_TYPES
    with pytest.raises(WeightError) as e:
        weights.load_gguf(path)
    assert qtype in str(e.value) and bad in str(e.value)
    assert "Q4_1" in str(e.value)  # says what is supported


# K-quants on hand-made blocks, against llama.cpp's ggml-quants.c transcribed to numpy.

def _ref_q4_k(block: np.ndarray) -> np.ndarray:
    d, dmin = block[0:2].view(np.float16)[0], block[2:4].view(np.float16)[0]
    q_sc, qs = block[4:16], block[16:144]

    def scale_min(j):
        if j < 4:
            return q_sc[j] & 63, q_sc[j + 4] & 63
        return (q_sc[j + 4] & 0xF) | ((q_sc[j - 4] >> 6) << 4), (q_sc[j + 4] >> 4) | ((q_sc[j] >> 6) << 4)

    y = np.zeros(256, np.float32)
    for n, j in enumerate(range(0, 256, 64)):
        q = qs[32 * n: 32 * n + 32].astype(np.int32)
        sc1, m1 = scale_min(2 * n)
        sc2, m2 = scale_min(2 * n + 1)
        y[j:j + 32] = np.float32(d) * sc1 * (q & 0xF) - np.float32(dmin) * m1
        y[j + 32:j + 64] = np.float32(d) * sc2 * (q >> 4) - np.float32(dmin) * m2
    return y


def _ref_q6_k(block: np.ndarray) -> np.ndarray:
    ql, qh, sc = block[0:128].astype(np.int32), block[128:192].astype(np.int32), block[192:208].view(np.int8)
    d = np.float32(block[208:210].view(np.float16)[0])
    y = np.zeros(256, np.float32)
    for n in range(2):
        l_ = np.arange(32)
        QL, QH, SC = ql[64 * n:], qh[32 * n:], sc[8 * n:].astype(np.float32)
        q1 = ((QL[l_] & 0xF) | (((QH[l_] >> 0) & 3) << 4)) - 32
        q2 = ((QL[l_ + 32] & 0xF) | (((QH[l_] >> 2) & 3) << 4)) - 32
        q3 = ((QL[l_] >> 4) | (((QH[l_] >> 4) & 3) << 4)) - 32
        q4 = ((QL[l_ + 32] >> 4) | (((QH[l_] >> 6) & 3) << 4)) - 32
        is_ = l_ // 16
        base = 128 * n
        y[base + l_] = d * SC[is_] * q1
        y[base + 32 + l_] = d * SC[is_ + 2] * q2
        y[base + 64 + l_] = d * SC[is_ + 4] * q3
        y[base + 96 + l_] = d * SC[is_ + 6] * q4
    return y


@pytest.mark.parametrize("qtype,nbytes,ref", [("Q4_K", 144, _ref_q4_k), ("Q6_K", 210, _ref_q6_k)])
def test_gguf_k_quants_dequantize(tmp_path, qtype, nbytes, ref):
    import gguf

    rng = np.random.default_rng(43)
    blocks = rng.integers(0, 256, size=(3, nbytes), dtype=np.uint8)  # 3 rows of one super-block each
    scale = np.array([0.01, 0.02, 0.005], np.float16).view(np.uint8).reshape(3, 2)
    if qtype == "Q4_K":
        blocks[:, 0:2] = scale
        blocks[:, 2:4] = np.array([0.003, 0.001, 0.002], np.float16).view(np.uint8).reshape(3, 2)
    else:
        blocks[:, 208:210] = scale
    path = tmp_path / f"{qtype}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("k_quant.weight", blocks, raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (tensor,) = weights.read_gguf(path).tensors
    got = weights.dequantize(tensor)
    assert got.shape == (3, 256) and got.dtype == np.float32
    want = np.stack([ref(b) for b in blocks])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.std(want) > 0


# Q8_0 and Q4_1, the real file's quantized types, on the real file.

def _ref_q8_0(row: np.ndarray) -> np.ndarray:
    b = row.reshape(-1, 34)
    return (b[:, :2].copy().view(np.float16).astype(np.float32) * b[:, 2:].view(np.int8)).reshape(-1)


def _ref_q4_1(row: np.ndarray) -> np.ndarray:
    b = row.reshape(-1, 20)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = b[:, 4:].astype(np.int32)
    return np.concatenate([d * (qs & 0xF) + m, d * (qs >> 4) + m], axis=1).reshape(-1)


def test_real_file_types_dequantize():
    import gguf

    reader = weights.read_gguf(smollm2_path())
    types = {gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors}
    assert types == {"F32", "Q8_0", "Q4_1"}
    assert types <= set(weights.SUPPORTED_GGUF_TYPES)
    refs = {"Q8_0": _ref_q8_0, "Q4_1": _ref_q4_1}
    by_name = {t.name: t for t in reader.tensors}
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.7.ffn_down.weight", "blk.0.attn_norm.weight"):
        t = by_name[name]
        kind = gguf.GGMLQuantizationType(t.tensor_type).name
        got = weights.dequantize(t)
        assert got.dtype == np.float32 and got.shape == tuple(int(s) for s in reversed(t.shape))
        rows = [0, got.shape[0] // 2, got.shape[0] - 1]
        for r in rows:
            want = np.asarray(t.data[r], np.float32) if kind == "F32" else refs[kind](np.asarray(t.data[r]))
            np.testing.assert_array_equal(got[r], want)
