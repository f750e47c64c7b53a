"""Tiny random-weight checkpoints shaped like the model families people fine-tune.

Each config is a scaled-down copy of the family's released config.json that keeps every feature
flag the converter and llama.cpp must get right: tied or untied embeddings, q/k/v biases, rope
scaling, q/k norms, logit soft-capping, sliding windows, an explicit head_dim, fused projections,
and the family's kind of vocabulary (SentencePiece, or byte-level BPE with its pre-tokenizer and
special tokens). Every Linear input width is a multiple of 256, so that q4_k_m fits every layer.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.llamacpp import PRE_TOKENIZERS

SMALL = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "max_position_embeddings": 512}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
CHATML = ["<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# family -> (config.json keys, tokenizer: "sentencepiece" or a llama.cpp pre-tokenizer name, special tokens)
FAMILIES = {
    # Llama 2: SentencePiece with byte fallback, untied, plain rope.
    "llama2": ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SMALL, "num_attention_heads": 4,
                "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}, "sentencepiece", []),
    # Llama 3.2 1B: llama3 rope scaling, GQA, tied embeddings, tiktoken-style BPE.
    "llama3.2": ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SMALL, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-5, "rope_scaling": LLAMA3_ROPE,
                  "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": True},
                 "llama-bpe", LLAMA3_SPECIAL),
    # SmolLM2: Llama architecture, tied, GPT-2 style byte-level BPE.
    "smollm2": ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SMALL, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "rope_theta": 100000.0, "tie_word_embeddings": True}, "gpt-2", CHATML),
    # Mistral 7B v0.1: SentencePiece, a sliding window (wider than the training sequences here).
    "mistral": ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", **SMALL, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "sliding_window": 4096, "tie_word_embeddings": False}, "sentencepiece", []),
    # Mistral with a byte-level BPE vocabulary and no sliding window (v0.3 / Nemo style).
    "mistral-bpe": ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", **SMALL, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "head_dim": 64, "sliding_window": None, "tie_word_embeddings": False},
                    "llama-bpe", ["[INST]", "[/INST]"]),
    # Qwen2.5: q/k/v biases, tied embeddings, ChatML specials, Qwen's pre-tokenizer.
    "qwen2.5": ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **SMALL, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "rope_theta": 1000000.0, "use_sliding_window": False, "sliding_window": 32768,
                 "tie_word_embeddings": True}, "qwen2", CHATML),
    # Qwen3: q/k norms, head_dim not hidden / heads.
    "qwen3": ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **SMALL, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 128, "rope_theta": 1000000.0, "tie_word_embeddings": True},
              "qwen2", CHATML),
    # Gemma 2: norm weights + 1, attention and final logit soft-capping, alternating sliding-window
    # layers (a window shorter than the sequences, which llama.cpp applies), SentencePiece.
    "gemma2": ({"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", **SMALL, "num_attention_heads": 2,
                "num_key_value_heads": 1, "head_dim": 128, "query_pre_attn_scalar": 128, "sliding_window": 32,
                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                "hidden_activation": "gelu_pytorch_tanh"}, "sentencepiece", ["<start_of_turn>", "<end_of_turn>"]),
    # Gemma 3 (text): q/k norms, local and global rope bases, sliding-window layers, SentencePiece.
    # Five local layers to one global, the pattern llama.cpp assumes for Gemma 3.
    "gemma3": ({"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **SMALL, "num_hidden_layers": 6,
                "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128, "query_pre_attn_scalar": 128,
                "sliding_window": 32, "layer_types": ["sliding_attention"] * 5 + ["full_attention"], "rope_theta": 1000000.0,
                "rope_local_base_freq": 10000.0}, "sentencepiece", ["<start_of_turn>", "<end_of_turn>"]),
    # Phi-3 mini: fused qkv and gate_up projections, SentencePiece (Llama 2's), a sliding window.
    "phi3": ({"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", **SMALL, "num_attention_heads": 4,
              "num_key_value_heads": 4, "sliding_window": 2047, "tie_word_embeddings": False}, "sentencepiece",
             ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]),
    # Phi-4-mini: partial rotary (0.75) with LongRoPE factors, GQA, tied, byte-level BPE that its
    # tokenizer_config.json declares a GPT2Tokenizer (the converter reads the vocabulary by that).
    "phi4-mini": ({"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", **SMALL, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "partial_rotary_factor": 0.75, "max_position_embeddings": 131072,
                   "original_max_position_embeddings": 4096, "sliding_window": None, "tie_word_embeddings": True,
                   "rope_scaling": {"rope_type": "longrope", "long_factor": [1.0 + i / 8 for i in range(24)],
                                    "short_factor": [1.0 + i / 64 for i in range(24)]}},
                  "llama-bpe", ["<|user|>", "<|assistant|>", "<|end|>"]),
}
TOKENIZER_CLASSES = {"phi4-mini": "GPT2Tokenizer"}
# SentencePiece families: transformers' tokenizer class, whether the vocabulary adds a leading
# space to the text (Gemma's does not), and whether the special tokens are pieces of the
# SentencePiece model (Gemma) or tokens added after it (Phi-3).
SENTENCEPIECE = {"gemma2": ("GemmaTokenizer", False, True), "gemma3": ("GemmaTokenizer", False, True),
                 "phi3": ("LlamaTokenizer", True, False)}


def documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def sentencepiece_tokenizer(path: Path, special: list[str], tokenizer_class: str, dummy_prefix: bool, inside: bool):
    """A SentencePiece BPE vocabulary with byte fallback, trained offline, as Llama 2, Mistral v0.1,
    Gemma and Phi-3 ship theirs (tokenizer.model), loaded the way transformers loads theirs."""
    import sentencepiece
    from transformers import AutoTokenizer

    path.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(documents()), model_prefix=str(path / "sp"), vocab_size=1024, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        user_defined_symbols=special if inside else [], add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    (path / "sp.model").rename(path / "tokenizer.model")
    (path / "sp.vocab").unlink()
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": tokenizer_class, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not inside:
        tokenizer.add_tokens(special, special_tokens=True)
    return tokenizer


def bpe_tokenizer(pre: str, special: list[str]):
    """Byte-level BPE with llama.cpp pre-tokenizer `pre`'s regex, trained offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    regex = next(k for k, v in PRE_TOKENIZERS.items() if v == pre)
    tokenizer = Tokenizer(models.BPE())
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None)
    tokenizer.pre_tokenizer = level if regex is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated"), level])
    tokenizer.decoder = decoders.ByteLevel()
    end = "<|endoftext|>"
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=[end, *special], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=end, eos_token=end, pad_token=end)


def checkpoint(family: str, path: Path, **config_overrides) -> Path:
    """`family`'s tiny checkpoint at `path`: config.json, random weights, tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.tokenizer import save_tokenizer

    keys, vocabulary, special = FAMILIES[family]
    if vocabulary == "sentencepiece":
        tokenizer = sentencepiece_tokenizer(path / "tokenizer-source", special,
                                            *SENTENCEPIECE.get(family, ("LlamaTokenizer", True, True)))
    else:
        tokenizer = bpe_tokenizer(vocabulary, special)
    keys = {**keys, **config_overrides}
    config = AutoConfig.for_model(keys.pop("model_type"), **{k: v for k, v in keys.items() if k != "architectures"},
                                  vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == keys["architectures"][0], type(model).__name__
    model.save_pretrained(path)
    save_tokenizer(tokenizer, path)
    if family in TOKENIZER_CLASSES:
        config_file = path / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tokenizer_class": TOKENIZER_CLASSES[family]}))
    return path
