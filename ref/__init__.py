"""ref: a readable NumPy reference of Gemma 4 12B Unified (encoder-free: images, audio, video -> one decoder).

Dimension letters used in every shape comment:
  B batch            T tokens (queries)       S keys (cached + new)     D hidden (3840)
  H query heads      K kv heads               G = H / K                 Dh head dim (256; 512 global)
  V vocabulary       I MLP width              N images / clips          P patches per image (budget)
  E vision width (mm_embed_dim)               F frame samples (640)     Ta audio frames

Reading order, bottom up: config, safetensors_io, layers, masks, image/audio/video, weights,
embedders, decoder, generate, model.
"""

from .audio import preprocess_audio
from .config import Config, from_hf_dict, from_name, load_config
from .errors import CheckpointError, ConfigError
from .image import preprocess_images
from .model import Model, load_model
from .video import preprocess_video

__all__ = ["Model", "load_model", "Config", "load_config", "from_hf_dict", "from_name", "preprocess_images",
           "preprocess_audio", "preprocess_video", "CheckpointError", "ConfigError"]
