"""HF (safetensors / .bin / GGUF) -> JAX param pytrees -> orbax checkpoints."""

from checkpoints_convert.hf import (
    CheckpointMismatch,
    convert_state_dict,
    expected_shapes,
    load_gguf,
    load_hf_dir,
)
from checkpoints_convert.orbax_io import (
    DamagedCheckpoint,
    check_destination,
    is_converted_dir,
    load_converted,
    save_converted,
)

__all__ = [
    "CheckpointMismatch",
    "DamagedCheckpoint",
    "check_destination",
    "convert_state_dict",
    "expected_shapes",
    "load_gguf",
    "load_hf_dir",
    "is_converted_dir",
    "load_converted",
    "save_converted",
]
