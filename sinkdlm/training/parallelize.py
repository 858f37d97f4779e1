"""Parallelism applied to the model from outside, as torchtitan keeps `parallelize.py` beside each
model: model.py stays single-device; this file compiles and checkpoints each Block and shards the
model with FSDP2 (`fully_shard` per Block, then the root). `parallelize` is what Lightning Fabric's
`ModelParallelStrategy` calls; the same code runs on GPUs with NCCL and on CPU processes with gloo.
"""

from __future__ import annotations

import warnings

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from sinkdlm.config import TrainConfig
from sinkdlm.model import DLM

# Block methods DLM calls besides forward (the sink's own stream): FSDP must gather a Block's
# parameters around them too
BLOCK_FORWARD_METHODS = ("self_only_sink", "with_sink_seeing_all")
FSDP_MESH_DIM = "fsdp"
# a Block's self_only_sink returns its keys/values as views; they are only read (RoPE and
# concatenation make new tensors), so FSDP's warning about in-place ops on view outputs does not apply
VIEW_OUTPUT_WARNING = r"FSDP2-wrapped module \(\w+\) returned a view tensor"
# FSDP2 casts parameters for compute and reduces gradients in float32 (torchtitan's default)
PARAM_DTYPES = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16}


def apply_block_options(model: DLM, train_cfg: TrainConfig) -> DLM:
    """Activation checkpointing, then torch.compile, per Block, in place (any strategy).

    The wrappers add `_checkpoint_wrapped_module.` / `_orig_mod.` to parameter names; the
    torch.distributed.checkpoint state-dict functions the trainer saves with remove them, so
    checkpoints keep the plain model's names.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(list(model.blocks)):
        if train_cfg.activation_checkpointing:
            block = checkpoint_wrapper(block)  # non-reentrant: composes with compile and FSDP2
        if train_cfg.compile:
            block = torch.compile(block)
        model.blocks.register_module(str(i), block)
    return model


def mixed_precision(precision: str):
    """FSDP2's MixedPrecisionPolicy for train.precision (one of config.FSDP_PRECISIONS)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[precision], reduce_dtype=torch.float32)


def flat_mesh(device_mesh: DeviceMesh) -> DeviceMesh:
    """One dimension over every rank: Fabric's mesh is (nodes, devices per node), and FSDP here
    shards over all of them."""
    return init_device_mesh(device_mesh.device_type, (device_mesh.size(),), mesh_dim_names=(FSDP_MESH_DIM,))


def parallelize(model: DLM, device_mesh: DeviceMesh, train_cfg: TrainConfig) -> DLM:
    """Block options, then FSDP2: each Block is its own unit (gathered for its forward and
    backward, resharded after), then the root holds the embedding, sinks, final norm and head."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    warnings.filterwarnings("ignore", message=VIEW_OUTPUT_WARNING, category=UserWarning)
    model = apply_block_options(model, train_cfg)
    mesh, policy = flat_mesh(device_mesh), mixed_precision(train_cfg.precision)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
        for name in BLOCK_FORWARD_METHODS:
            register_fsdp_forward_method(block, name)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
