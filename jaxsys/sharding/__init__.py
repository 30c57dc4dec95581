"""Meshes, logical axis names and the one logical->mesh rules table."""

from jaxsys.sharding import axes as axes
from jaxsys.sharding.rules import LOGICAL_RULES as LOGICAL_RULES
from jaxsys.sharding.rules import MeshConfig as MeshConfig
from jaxsys.sharding.rules import activate as activate
from jaxsys.sharding.rules import active_mesh as active_mesh
from jaxsys.sharding.rules import constrain as constrain
from jaxsys.sharding.rules import logical_sharding as logical_sharding
from jaxsys.sharding.rules import logical_to_spec as logical_to_spec
from jaxsys.sharding.rules import make_mesh as make_mesh
from jaxsys.sharding.rules import mesh_axes_of as mesh_axes_of
from jaxsys.sharding.rules import tree_shardings as tree_shardings

__all__ = ["axes", "LOGICAL_RULES", "MeshConfig", "activate", "active_mesh", "constrain",
           "logical_sharding", "logical_to_spec", "make_mesh", "mesh_axes_of", "tree_shardings"]
