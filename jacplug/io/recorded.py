"""What a checkpoint's metadata may hand to a model constructor: a model name and architecture arguments.

Why: a checkpoint comes from someone else as often as from this machine, and its metadata reaches
``timm.create_model(name, **model_kwargs)``. timm's ``create_model`` takes more than architecture
there: ``checkpoint_path`` loads another file (with ``torch.load``), ``pretrained``/``pretrained_cfg``/
``pretrained_cfg_overlay`` download weights from an address of the file's choosing, ``cache_dir`` writes
where it says; and a recorded model name with path separators (``../x``, ``hf-hub:org/repo``) becomes
folders outside ``runs/`` (the default ``--out`` is built from the names) or a download. The file's
recorded arguments are therefore checked against an *allow*-list of architecture arguments: a deny-list
is only as complete as the timm version it was written against, and every new timm release may add
another argument that reaches a file or the network; an allow-list fails closed, and an argument it
lacks is given on the command line (``--teacher-kwargs``), where the user chose it.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import UserError

#: constructor arguments that shape a model and nothing else (sizes, depths, widths, rates, layer names)
ARCHITECTURE_ARGS = frozenset({
    "img_size", "patch_size", "window_size", "embed_dim", "embed_dims", "dim", "dims", "hidden_dim", "head_dim",
    "depth", "depths", "layers", "num_heads", "heads", "mlp_ratio", "mlp_ratios", "sr_ratios", "kernel_size",
    "stride", "width", "widths", "width_mult", "width_factor", "channels", "channel_multiplier",
    "depth_multiplier", "base_width", "cardinality", "groups", "stem_width", "stem_chs", "stem_type",
    "output_stride", "num_features", "global_pool", "class_token", "no_embed_class", "reg_tokens",
    "pos_embed", "dynamic_img_size", "dynamic_img_pad", "qkv_bias", "qk_norm", "init_values",
    "ls_init_value", "layer_scale_init_value", "pre_norm", "fc_norm", "drop_rate", "drop_path_rate",
    "attn_drop_rate", "proj_drop_rate", "pos_drop_rate", "patch_drop_rate", "drop_block_rate", "act_layer",
    "norm_layer", "weight_init", "zero_init_last", "use_abs_pos", "use_rel_pos", "pad_type",
})

#: how a user who trusts the file passes the argument themselves
_YOURSELF = "if you trust it, pass it yourself (--teacher-kwargs, or timm.create_model and jacplug.load_weights)"

#: a registered model name: timm's charset (``resnet18``, ``vit_tiny_patch16_224.augreg_in21k``) plus ``-``;
#: no path separator, no ``hf-hub:``/``local-dir:`` prefix
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


def recorded_model_name(name: str, where: str) -> str:
    """``name`` if it is a model name (see :data:`_NAME`, no ``..``); else a one-line UserError naming ``where``."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise UserError(f"{where} records the model name {name!r}, which is not a model name (letters, digits, "
                        "'_', '.', '-'; no path separators or '..'); pass the model with --teacher")
    return name


def recorded_model_kwargs(kwargs: Any, where: str) -> dict[str, Any]:
    """``kwargs`` if every key is an architecture argument (:data:`ARCHITECTURE_ARGS`) and every value a
    number, boolean, null, short name or list of them; else a one-line UserError naming the key."""
    if not isinstance(kwargs, dict):
        raise UserError(f"{where} records model arguments that are not a mapping ({type(kwargs).__name__}); "
                        "pass the model's arguments with --teacher-kwargs")
    for key, value in kwargs.items():
        if key not in ARCHITECTURE_ARGS:
            raise UserError(f"{where} records the model argument {key!r}, which jacplug does not take from a file "
                            f"(only architecture arguments such as img_size or depth); {_YOURSELF}")
        if not _plain(value):
            raise UserError(f"{where} records the model argument {key}={value!r}, which is not a number, boolean, "
                            f"null, name or list of them; {_YOURSELF}")
    return kwargs


def _plain(value: Any) -> bool:
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, str):
        return bool(_NAME.fullmatch(value)) and ".." not in value
    return value is None or isinstance(value, (bool, int, float))
