"""mmstack.processing: image preprocessing, tokenizers and processors that travel with checkpoints."""

from mmstack.processing.image import ImageProcessingConfig
from mmstack.processing.tokenizer import train_caption_tokenizer
from mmstack.processing.two_tower import TwoTowerProcessor

__all__ = ["ImageProcessingConfig", "TwoTowerProcessor", "train_caption_tokenizer"]
