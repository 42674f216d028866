"""bench/throughput.py's own parts: LLaVA's modality-length grouped order, its padded batches, and the dataset whose
conversations tokenise to the lengths drawn from the mix."""

import argparse
import numpy as np
import torch

from bench import throughput
from vlm_jax.data.llava_json import LlavaJsonSource


def test_even_chunks_deal_longest_first_to_the_lightest_chunk():
    lengths = {0: 10, 1: 9, 2: 3, 3: 2}
    # 0 -> chunk 0 (10), 1 -> chunk 1 (9), 2 -> chunk 1 (12, now full), 3 -> chunk 0.
    assert throughput.even_chunks([0, 1, 2, 3], lengths, 2) == [[0, 3], [1, 2]]
    assert throughput.even_chunks([0, 1, 2], lengths, 2) == [[0, 2], [1]]  # not divisible: round-robin


def test_modality_grouped_order():
    # Multimodal 0-4 (positive word counts), text-only 5-7 (negative).
    lengths = [5, 50, 20, 40, 10, -30, -60, -45]
    torch.manual_seed(0)
    order = throughput.modality_grouped(lengths, batch=2, world=1)
    assert sorted(order) == list(range(8))
    batches = [order[k:k + 2] for k in range(0, 8, 2)]
    # The two modalities' last partial megabatches (one example each) fill the first batch.
    assert sorted(lengths[i] > 0 for i in batches[0]) == [False, True]
    for batch in batches[1:]:
        assert len({lengths[i] > 0 for i in batch}) == 1, batches
        assert [abs(lengths[i]) for i in batch] == sorted((abs(lengths[i]) for i in batch), reverse=True)
    # The shuffle is torch's global generator's, as LLaVA's sampler draws it.
    torch.manual_seed(0)
    assert throughput.modality_grouped(lengths, batch=2, world=1) == order
    # One modality alone (LLaVA asserts both) is grouped by itself.
    torch.manual_seed(0)
    assert sorted(throughput.modality_grouped([3, 1, 2], batch=2, world=1)) == [0, 1, 2]


def test_modality_lengths_count_words_and_sign_text_only():
    records = [{"image": "a.jpg", "conversations": [{"value": "<image>\nw1 w2"}, {"value": "w3"}]},
               {"conversations": [{"value": "w1 w2 w3 w4"}, {"value": "w5"}]}]
    assert throughput.modality_lengths(records) == [4, -5]


def test_padded_batch_right_pads_with_labels_off_the_loss():
    pixels = np.ones((1, 3, 4, 4), np.float32)
    examples = [dict(tokens=np.array([1, 7, 8, 9], np.int32), loss=np.array([0, 0, 1, 1], bool), pixels=pixels),
                dict(tokens=np.array([1, 5], np.int32), loss=np.array([0, 1], bool), pixels=None)]
    batch = throughput.padded_batch(examples, pad_id=3)
    assert batch["input_ids"].tolist() == [[1, 7, 8, 9], [1, 5, 3, 3]]
    assert batch["labels"].tolist() == [[-100, -100, 8, 9], [-100, 5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["pixel_values"].shape == (1, 3, 4, 4)
    assert throughput.padded_batch(examples[1:], pad_id=3)["pixel_values"] is None


def test_dataset_tokenises_to_the_drawn_lengths(tmp_path):
    a = argparse.Namespace(vocab=128, image_size=28, patch=14, examples=12, seq_len=300, seed=0)
    words = throughput.tokenizer_words(a, str(tmp_path / "tokenizer"))
    encoder = throughput.conversation_encoder(a, str(tmp_path / "tokenizer"))
    lengths = throughput.write_dataset(a, str(tmp_path / "data"), words, encoder)
    drawn = throughput.draw_lengths(np.random.default_rng(a.seed), a.examples, a.seq_len, 4)
    # A draw shorter than the system text and one exchange of a word each is worded to that.
    shortest = len(encoder.encode([("human", "w0"), ("gpt", "w0")], [], "x").tokens)
    assert lengths == [max(target, shortest + 4 * image) for target, image in drawn]
    assert a.seq_len in lengths and not all(image for _, image in drawn)  # a cut draw, a text-only one
    source = LlavaJsonSource(str(tmp_path / "data" / "data.json"))
    for k, (_, image) in enumerate(drawn):
        record = source[k]
        assert len(record["images"]) == image
        enc = encoder.encode(record["conversations"], [4] * image, record["id"])
        assert len(enc.tokens) == lengths[k] and enc.loss.any()
