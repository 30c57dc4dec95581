"""`jaxsys train gnn`, typed configs with overrides, the structure cache, bundled configs."""

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from jaxsys.gnn import StructureConfig, dataset_relations, load_config, make_csl
from jaxsys.gnn.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "CSGNN" in out and "key=value" in out and "--config" in out


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "gnn").glob("*.yaml")))
def test_bundled_configs_validate(path):
    cfg = load_config(path)
    assert cfg.data.name == path.stem


def test_overrides_and_validation_errors():
    cfg = load_config(ROOT / "configs/gnn/csl.yaml",
                      ["structure.kind=gin", "train.epochs=3", "structure.flag_lengths=[4,5]"])
    assert cfg.structure.kind == "gin" and cfg.train.epochs == 3
    assert cfg.structure.flag_lengths == (4, 5)
    with pytest.raises(ValidationError, match="lenght_bound"):
        load_config(None, ["data.name=csl", "structure.lenght_bound=5"])  # typo: extra field
    with pytest.raises(ValidationError, match="folds"):
        load_config(None, ["data.name=csl", "train.folds=2"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["data.name"])


def test_cli_bad_config_is_a_clear_error(capsys):
    assert main(["--config", "csl", "model.width=-3"]) == 2
    assert "bad config" in capsys.readouterr().err
    assert main(["--config", "no_such_config"]) == 2
    assert "neither a file nor a bundled config" in capsys.readouterr().err


def test_cli_dataset_without_labels(capsys):
    assert main(["--config", "csl", "data.name=sr25", "-q"]) == 1
    assert "no labels" in capsys.readouterr().err


def test_cli_trains_and_writes_metrics(tmp_path, monkeypatch, capsys):
    import jaxsys.runtime

    monkeypatch.setenv("JAXSYS_CACHE_DIR", str(tmp_path / "cache"))
    # The CLI turns on JAX's persistent compilation cache globally; keep it out of this process.
    monkeypatch.setattr(jaxsys.runtime, "enable_compilation_cache", lambda: None)
    out = tmp_path / "m.json"
    rc = main(["--config", "csl", "-q", "--out", str(out), "train.epochs=2",
               "train.max_folds=1", "model.width=8", "model.depth=1", "train.batch_size=30"])
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["dataset"] == "csl" and m["model"] == "csgnn" and len(m["folds"]) == 1
    assert m["compiles"] == 2 and m["folds"][0]["sizes"] == [90, 30, 30]
    assert "test accuracy" in capsys.readouterr().out


def test_structure_cache_roundtrip_and_keys(tmp_path):
    ds = make_csl(seed=0, per_class=1)
    cfg = StructureConfig(kind="csgnn", length_bound=6)
    first = dataset_relations(ds, cfg, cache_root=tmp_path, progress=False)
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    again = dataset_relations(ds, cfg, cache_root=tmp_path, progress=False)
    for a, b in zip(first, again):
        for f in ("senders", "receivers", "types", "weights", "node_features"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
        assert a.num_cycles == b.num_cycles and a.num_types == b.num_types
    # another spec or other graphs -> another file; KP-GNN's fields do not split CSGNN's cache
    dataset_relations(ds, cfg.model_copy(update={"length_bound": 5}), cache_root=tmp_path,
                      progress=False)
    dataset_relations(make_csl(seed=1, per_class=1), cfg, cache_root=tmp_path, progress=False)
    dataset_relations(ds, cfg.model_copy(update={"hops": 5}), cache_root=tmp_path,
                      progress=False)
    assert len(list(tmp_path.iterdir())) == 3


def test_config_sections_share_the_one_base_and_names_say_what_they_configure():
    import jaxsys.gnn
    import jaxsys.train.config
    from jaxsys.config_base import ConfigSection

    sections = [getattr(jaxsys.gnn, n) for n in jaxsys.gnn.__all__ if n.endswith("Config")]
    assert sections and all(issubclass(c, ConfigSection) for c in sections)
    train_names = {n for n in dir(jaxsys.train.config) if n.endswith("Config")}
    assert not {c.__name__ for c in sections} & train_names
    with pytest.raises(ValidationError, match="frozen"):
        load_config(None, ["data.name=csl"]).train.epochs = 3
