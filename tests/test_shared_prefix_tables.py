"""The tuned tables of shared-prefix attention: the lookup by device kind, dtype, precision and
shape, its fallbacks, and that every table is valid and says where it was measured."""

from __future__ import annotations

import logging
import re

import pytest

from jaxsys.pallas_kernels.shared_prefix_attention import PRECISIONS, BlockSizes, CostModel, get_default
from jaxsys.pallas_kernels.shared_prefix_attention import tuned_block_sizes as tables

SHAPE = dict(q_per_kv=4, head_dim=128, page_size=16)


@pytest.mark.parametrize("key", list(tables.TABLES))
def test_every_table_is_valid_and_names_its_source(key):
    device, dtype, precision = key
    tuned = get_default(device, dtype, precision or "tf32x3", **SHAPE)
    assert isinstance(tuned.block_sizes, BlockSizes) and isinstance(tuned.cost_model, CostModel)
    assert tuned.block_sizes is tables.TABLES[key].block_sizes
    assert re.fullmatch(r"benchmarks/results/attention\w*\.json at [0-9a-f]{7} \(.+\)", tuned.source), tuned.source
    qb = tuned.block_sizes.items.query_block
    assert tuned.cost_model.token_cost(qb) > 0 and tuned.cost_model.overhead(qb) >= 0


def test_each_precision_finds_its_table():
    h200 = {p: get_default("NVIDIA H200", "float32", p, **SHAPE) for p in PRECISIONS}
    assert h200["tf32"].block_sizes != h200["tf32x3"].block_sizes
    assert h200["tf32"].cost_model != h200["tf32x3"].cost_model
    # a precision without a table of its own runs the default precision's
    assert h200["ieee"] == h200["tf32x3"]
    # bf16 products whatever the precision; bf16 has tiles of its own and borrows the fp32 model
    bf16 = {p: get_default("NVIDIA H200", "bfloat16", p, **SHAPE) for p in PRECISIONS}
    assert len({d.block_sizes for d in bf16.values()}) == 1
    assert bf16["tf32x3"].block_sizes != h200["tf32x3"].block_sizes
    assert bf16["tf32x3"].cost_model == h200["tf32x3"].cost_model
    # the CPU's XLA path computes IEEE fp32 whatever it is asked
    assert len({get_default("cpu", "float32", p, **SHAPE) for p in PRECISIONS}) == 1


def test_untuned_shape_keeps_the_device_cost_model():
    tuned = get_default("NVIDIA H200", "float32", "tf32", **SHAPE)
    other = get_default("NVIDIA H200", "float32", "tf32", q_per_kv=3, head_dim=64, page_size=16)
    assert other.block_sizes == tables.UNTUNED_BLOCK_SIZES["NVIDIA H200"] != tuned.block_sizes
    assert other.cost_model == tuned.cost_model and "untuned" in other.source
    assert get_default("cpu", "bfloat16", **SHAPE).block_sizes == get_default("cpu", "float32", **SHAPE).block_sizes


def test_unknown_device_gets_the_conservative_default_and_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger=tables.__name__):
        first = get_default("NVIDIA Z9 (unmeasured)", "float32", **SHAPE)
        again = get_default("NVIDIA Z9 (unmeasured)", "bfloat16", "tf32", q_per_kv=3, head_dim=64, page_size=16)
    assert first is again is tables.CONSERVATIVE
    lines = [r.getMessage() for r in caplog.records if "NVIDIA Z9" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    # the conservative model shares only where the saving is large: its step overhead is the largest
    overheads = [t.cost_model.overhead(64) for t in tables.TABLES.values()]
    assert first.cost_model.overhead(64) == max(overheads)


def test_precision_is_validated():
    with pytest.raises(ValueError, match="precision must be one of"):
        get_default("cpu", "float32", "auto", **SHAPE)
