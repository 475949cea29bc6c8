"""The tiny-model builder writes a loadable, deterministic Hugging Face folder."""

from __future__ import annotations

import hashlib
import json

from bowline_runtime.tools.tiny_model import PRESETS, build_tiny_model


def test_folder_has_every_file_and_loads(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        assert (tiny_model_dir / name).is_file(), name
    assert "chat_template" in json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == PRESETS["tiny"].vocab_size
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tokenizer) == PRESETS["tiny"].vocab_size


def test_chinese_and_english_round_trip_without_unknown_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in ["Hello, world! How are you?", "你好，世界！今天天气很好。", "混合 mixed 文本 text 🚀 ünïcode"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


def test_chat_template_renders_chatml(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_same_seed_same_files(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again", preset="tiny", arch="llama", seed=0)
    for name in ["model.safetensors", "tokenizer.json", "config.json"]:
        digest = [hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (tiny_model_dir, again)]
        assert digest[0] == digest[1], name


def test_qwen2_arch_has_attention_bias(tiny_qwen2_dir):
    config = json.loads((tiny_qwen2_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2"


def test_qwen25_preset_has_qwen25_05b_shapes():
    from bowline_runtime.tools.tiny_model import build_config

    shape = PRESETS["qwen2.5-0.5b"]
    config = build_config(shape, shape.arch, shape.vocab_size, eos_ids=[2, 0], pad_id=0).to_dict()
    assert config["model_type"] == "qwen2"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (896, 4864, 24)
    assert (config["num_attention_heads"], config["num_key_value_heads"], shape.head_dim) == (14, 2, 64)
    assert (config["vocab_size"], config["max_position_embeddings"]) == (151936, 32768)
    assert config["rope_parameters"]["rope_theta"] == 1000000.0
    assert config["rms_norm_eps"] == 1e-6
    assert config["tie_word_embeddings"] is True
    assert shape.config_only and shape.tokenizer_vocab < shape.vocab_size


def test_config_only_writes_config_and_tokenizer_but_no_weights(tmp_path):
    from bowline_runtime.cli import main
    from transformers import AutoConfig, AutoTokenizer

    main(["make-tiny-model", str(tmp_path), "--preset", "tiny", "--arch", "qwen2", "--config-only"])
    for name in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]:
        assert (tmp_path / name).is_file(), name
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == "qwen2" and config.architectures == ["Qwen2ForCausalLM"]
    assert len(AutoTokenizer.from_pretrained(tmp_path)) == PRESETS["tiny"].vocab_size


def test_draft_model_shares_the_tokenizer_and_the_first_layers(tiny_model_dir, tmp_path):
    import torch
    from bowline_runtime.cli import main
    from transformers import AutoModelForCausalLM, AutoTokenizer

    main(["make-draft-model", str(tiny_model_dir), str(tmp_path / "d1"), "--num-layers", "1"])
    main(["make-draft-model", str(tiny_model_dir), str(tmp_path / "copy"), "--copy"])
    target = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    d1 = AutoModelForCausalLM.from_pretrained(tmp_path / "d1", dtype=torch.float32)
    copy = AutoModelForCausalLM.from_pretrained(tmp_path / "copy", dtype=torch.float32)
    assert d1.config.num_hidden_layers == 1 and copy.config.num_hidden_layers == target.config.num_hidden_layers
    assert torch.equal(d1.model.layers[0].mlp.up_proj.weight, target.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(d1.lm_head.weight, target.lm_head.weight)
    text = "hello world 你好"
    assert AutoTokenizer.from_pretrained(tmp_path / "d1").encode(text) == AutoTokenizer.from_pretrained(tiny_model_dir).encode(text)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        assert torch.equal(copy(ids).logits, target(ids).logits)
