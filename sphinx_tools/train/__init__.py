"""Finetuning SPHINX on LLaMA2-Accessory conversation data (``sphinx-tools train CONFIG``).

- ``config.py``: every key of the training YAML, its default and its check (:class:`TrainConfig`);
- ``data.py``: conversation text, tokens and loss labels, packed turns, datasets and batches;
- ``losses.py``: the loss, and the auxiliary ``token_position`` loss (:class:`TokenPlaces`);
- ``schedule.py``: the learning-rate schedule and the data-parallel gradient average, shared by
  the loop and the warm-up;
- ``loop.py``: :func:`train`, :func:`train_local`, checkpoints and the resume state;
- ``warmup.py``: the dense encoder warm-up that can run first (``encoder_warmup``).
"""

from .config import (
    PARTS,
    TOKEN_POSITION_DEFAULTS,
    TrainConfig,
    check_encoder_warmup,
    check_token_position,
)
from .data import (
    IGNORE,
    ConversationData,
    batches,
    collate,
    conversation_text,
    packed_mask,
    packed_positions,
    tokenize_conversation,
    tokenize_independent,
)
from .loop import (
    TRAIN_STATE,
    init_model,
    load_train_state,
    plain_state,
    save,
    save_train_state,
    set_trainable,
    train,
    train_device,
    train_local,
)
from .losses import TokenPlaces, coordinate_weights, loss_fn, patch_token_index
from .schedule import lr_at

__all__ = [
    "IGNORE", "PARTS", "TOKEN_POSITION_DEFAULTS", "TRAIN_STATE", "ConversationData", "TokenPlaces",
    "TrainConfig", "batches", "check_encoder_warmup", "check_token_position", "collate",
    "conversation_text", "coordinate_weights", "init_model", "load_train_state", "loss_fn", "lr_at",
    "packed_mask", "packed_positions", "patch_token_index", "plain_state", "save",
    "save_train_state", "set_trainable", "tokenize_conversation", "tokenize_independent", "train", "train_device",
    "train_local",
]
