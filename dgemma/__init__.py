"""dgemma: an engine for DiffusionGemma, the uniform-state block-diffusion Gemma 4 language model."""

from .cache import KVCache
from .config import ModelConfig, preset
from .model import DiffusionGemma
from .weights import CheckpointError, load_model, save_model

__version__ = "0.1.0"
__all__ = ["DiffusionGemma", "KVCache", "ModelConfig", "preset", "load_model", "save_model", "CheckpointError"]
