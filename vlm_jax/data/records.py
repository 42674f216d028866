"""What every record converter shares, whatever the image-input kind: the conversation encoder and the
record's images."""

import numpy as np
from PIL import Image

from vlm_jax.data.conversation import ConversationEncoder, get_template
from vlm_jax.data.images import to_rgb
from vlm_jax.data.tokenizer import special_ids


def make_encoder(config, tokenizer) -> ConversationEncoder:
    """The conversation encoder for data.template; its `stop_id` ends generation."""
    image_id = config.data.image_token_id
    ids = special_ids(tokenizer, None if image_id == -1 else image_id)
    return ConversationEncoder(get_template(config.data.template), tokenizer, ids.image, ids.bos, ids.eos,
                               config.data.system)


def record_images(record: dict) -> list[Image.Image]:
    """The record's images as RGB PIL images (`images.to_rgb`), in marker order ([] for text-only records)."""
    return [to_rgb(Image.fromarray(image) if isinstance(image, np.ndarray) else image) for image in record["images"]]
