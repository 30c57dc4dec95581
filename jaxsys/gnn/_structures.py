"""Per-dataset structure preprocessing with an on-disk cache and a progress bar.

`dataset_relations(dataset, cfg)` returns one `Relations` per graph. The result is cached as one
`.npz` file per (dataset contents, structure spec) under `cache_dir()`:
`$JAXSYS_CACHE_DIR/gnn`, else `$XDG_CACHE_HOME/jaxsys/gnn`, else `~/.cache/jaxsys/gnn`. The key
hashes the graphs themselves (not only the dataset name), the fields of the spec that change
relations, and a format version, so a stale cache can never be served for changed inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from jaxsys.gnn._config import StructureConfig
from jaxsys.gnn._datasets import Dataset
from jaxsys.gnn._relations import Relations, build_relations

__all__ = ["cache_dir", "dataset_relations"]

_FORMAT = 4  # bump when relation order or fields change


def cache_dir() -> Path:
    env = os.environ.get("JAXSYS_CACHE_DIR")
    if env:
        return Path(env) / "gnn"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxsys" / "gnn"


def _cache_path(dataset: Dataset, cfg: StructureConfig, root: Path) -> Path:
    key = json.dumps({"format": _FORMAT, "data": dataset.fingerprint(), "spec": cfg.cache_key()},
                     sort_keys=True, default=list)
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return root / f"{dataset.name}-{cfg.kind}-{digest}.npz"


def _save(path: Path, rels: list[Relations]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "senders": np.concatenate([r.senders for r in rels]),
        "receivers": np.concatenate([r.receivers for r in rels]),
        "types": np.concatenate([r.types for r in rels]),
        "weights": np.concatenate([r.weights for r in rels]),
        "rel_offsets": np.cumsum([0] + [r.num_relations for r in rels]),
        "node_features": np.concatenate([r.node_features for r in rels]),
        "node_offsets": np.cumsum([0] + [r.node_features.shape[0] for r in rels]),
        "num_cycles": np.asarray([r.num_cycles for r in rels], np.int64),
        "num_types": np.asarray(rels[0].num_types if rels else 0),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load(path: Path) -> list[Relations]:
    with np.load(path) as z:
        ro, no = z["rel_offsets"], z["node_offsets"]
        nt = int(z["num_types"])
        s, r, t, w, f, c = (z[k] for k in ("senders", "receivers", "types", "weights",
                                           "node_features", "num_cycles"))
    return [Relations(senders=s[ro[i]:ro[i + 1]], receivers=r[ro[i]:ro[i + 1]],
                      types=t[ro[i]:ro[i + 1]], weights=w[ro[i]:ro[i + 1]],
                      node_features=f[no[i]:no[i + 1]], num_types=nt, num_cycles=int(c[i]))
            for i in range(ro.shape[0] - 1)]


def dataset_relations(
    dataset: Dataset,
    cfg: StructureConfig,
    *,
    use_cache: bool = True,
    cache_root: Path | None = None,
    progress: bool = True,
    block: int = 512,
) -> list[Relations]:
    """Relations of every graph of `dataset` under `cfg`, from the cache or freshly built.

    Args:
      dataset: the graphs.
      cfg: the structure spec.
      use_cache: read and write the on-disk cache.
      cache_root: cache folder (default `cache_dir()`).
      progress: show a tqdm progress bar while building.
      block: graphs built together (vectorised cycle search and relation merge).
    """
    root = cache_root if cache_root is not None else cache_dir()
    path = _cache_path(dataset, cfg, root)
    if use_cache and path.is_file():
        rels = _load(path)
        if len(rels) == len(dataset):
            return rels
    from tqdm.auto import tqdm

    rels: list[Relations] = []
    with tqdm(total=len(dataset), desc=f"{cfg.kind} structures ({dataset.name})", unit="graph",
              disable=not progress, leave=False) as bar:
        for lo in range(0, len(dataset), block):
            chunk = dataset.graphs[lo:lo + block]
            rels.extend(build_relations(chunk, cfg))
            bar.update(len(chunk))
    if use_cache and rels:
        _save(path, rels)
    return rels
