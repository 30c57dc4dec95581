"""Llama-family decoder and MoE, the paged KV-cache layout, weight loading (and HF export) and tokenizers."""

from jaxsys.models.checkpoint import restore_params as restore_params
from jaxsys.models.checkpoint import save_params as save_params
from jaxsys.models.config import ConfigError as ConfigError
from jaxsys.models.config import ModelConfig as ModelConfig
from jaxsys.models.config import RopeScaling as RopeScaling
from jaxsys.models.decoder import forward as forward
from jaxsys.models.decoder import init_params as init_params
from jaxsys.models.decoder import param_logical_axes as param_logical_axes
from jaxsys.models.decoder import param_shapes as param_shapes
from jaxsys.models.hf_export import save_hf_folder as save_hf_folder
from jaxsys.models.kv_cache import AttentionMetadata as AttentionMetadata
from jaxsys.models.kv_cache import KVCache as KVCache
from jaxsys.models.kv_cache import init_cache as init_cache
from jaxsys.models.loading import LoadedModel as LoadedModel
from jaxsys.models.loading import load_model as load_model
from jaxsys.models.registry import DEFAULT_MODEL as DEFAULT_MODEL
from jaxsys.models.registry import REGISTRY as REGISTRY
from jaxsys.models.registry import ModelNotFoundError as ModelNotFoundError
from jaxsys.models.tokenizer import Tokenizer as Tokenizer
from jaxsys.models.tokenizer import TokenizerError as TokenizerError
from jaxsys.models.weights import WeightError as WeightError

__all__ = ["AttentionMetadata", "ConfigError", "DEFAULT_MODEL", "KVCache", "LoadedModel", "ModelConfig",
           "ModelNotFoundError", "REGISTRY", "RopeScaling", "Tokenizer", "TokenizerError", "WeightError",
           "forward", "init_cache", "init_params", "load_model", "param_logical_axes", "param_shapes",
           "restore_params", "save_hf_folder", "save_params"]
