"""A Hugging Face encoder as the text tower: build, save, load, tokenize offline."""
import json

import torch

import groupseg
from groupseg.segment import Segmenter


def _tiny_bert_dir(tmp_path):
    from transformers import BertConfig, BertModel

    d = tmp_path / "bert"
    cfg = BertConfig(vocab_size=40, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(d)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "dog", "cat", "road", "car", "."]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    return d


def test_hf_text_tower_builds_saves_and_loads(tmp_path):
    from groupseg.training.text_encoders import copy_tokenizer, hf_text_config, load_hf_text_weights

    src = _tiny_bert_dir(tmp_path)
    cfg = groupseg.get_model_config("groupvit-tiny-test")
    cfg.text = hf_text_config(str(src), context_length=16)
    assert cfg.text.kind == "hf" and cfg.text.width == 24
    model = groupseg.GroupViT(cfg).eval()
    load_hf_text_weights(model, str(src))
    from transformers import BertModel

    ref = BertModel.from_pretrained(src, add_pooling_layer=False)
    assert torch.equal(model.text.encoder.embeddings.word_embeddings.weight, ref.embeddings.word_embeddings.weight)

    out = tmp_path / "weights"
    model.save_pretrained(out)
    copy_tokenizer(str(src), out)
    seg = Segmenter.from_pretrained(out, templates="simple", short_side=32, text_precision="fp32")
    emb = seg.encode_texts(["dog", "cat", "road car"])
    fast = Segmenter.from_pretrained(out, templates="simple", short_side=32, text_precision="bf16").encode_texts(["dog", "cat", "road car"])
    assert (fast * emb).sum(-1).min() > 0.99  # bf16 prompt encoding stays close to fp32
    assert emb.shape == (3, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    with torch.no_grad():
        direct = model.encode_text(seg.tokenizer(["dog", "cat", "road car"]))
    assert torch.allclose(emb, direct, atol=1e-6)  # the saved model reproduces the one in memory
    # padding does not change an embedding: mean pooling honours the attention mask
    ids = seg.tokenizer(["dog"])
    with torch.no_grad():
        assert torch.allclose(model.encode_text(ids), model.encode_text(ids[:, :3]), atol=1e-6)
    assert seg.segment(torch.rand(3, 40, 40), "dog,road").label_map.shape == (40, 40)
