"""A tokenizer as the stages load and save it: the checkpoint's own, the files llama.cpp's converter
reads, and the vocabularies transformers mislabels rebuilt as what they are."""

from __future__ import annotations

import json
import re
from pathlib import Path


def save_tokenizer(tokenizer, directory: Path) -> None:
    """The tokenizer's files as llama.cpp's converter reads them. transformers 5 saves tokenizer.json
    alone; the converter reads a SentencePiece vocabulary (scores, byte pieces) from tokenizer.model,
    which added tokens are special from tokenizer_config.json's added_tokens_decoder (without it,
    <start_of_turn> and the like become plain text to llama.cpp), and which vocabulary reader to
    use from the tokenizer_class the checkpoint declared (Phi-4-mini's GPT2Tokenizer). A checkpoint that
    brought a SentencePiece vocabulary in tokenizer.json alone gets the tokenizer.model it stands for."""
    import shutil

    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.setdefault("added_tokens_decoder", {str(i): t.__getstate__() for i, t in tokenizer.added_tokens_decoder.items()})
    # The directory it was loaded from; a tokenizer built in memory (prepare's) has none.
    source = Path(str(tokenizer.name_or_path)) if tokenizer.name_or_path else None
    if source is not None and (source / "tokenizer.model").is_file():
        shutil.copy(source / "tokenizer.model", directory / "tokenizer.model")
    elif not (directory / "tokenizer.model").is_file() and (model := sentencepiece_model(tokenizer)) is not None:
        (directory / "tokenizer.model").write_bytes(model)
    if source is not None and (source / "tokenizer_config.json").is_file():
        declared = json.loads((source / "tokenizer_config.json").read_text())
        if "tokenizer_class" in declared:
            config["tokenizer_class"] = declared["tokenizer_class"]
    if tokenizer.init_kwargs.get("tokenizer_class") == "GPT2Tokenizer":  # a byte-level BPE (byte_level_rebuilt)
        config["tokenizer_class"] = "GPT2Tokenizer"
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))


BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
# Byte-level BPE writes every byte as one of 256 printable characters: a space as "Ġ", a newline as "Ċ".
BYTE_LEVEL_SPACE, BYTE_LEVEL_NEWLINE = "\u0120", "\u010a"


def checkpoint_tokenizer(source: str):
    """A checkpoint's tokenizer, as every stage that starts from it loads it: transformers' own,
    except a byte-level BPE vocabulary that a tokenizer.json declares a byte-fallback
    (SentencePiece-style) one, which is rebuilt as what it is (`byte_level_rebuilt`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    rebuilt = byte_level_rebuilt(tokenizer)
    return tokenizer if rebuilt is None else rebuilt


def byte_level_rebuilt(tokenizer):
    """None, or the tokenizer rebuilt as a byte-level BPE where its tokenizer.json calls a byte-level
    vocabulary a byte-fallback one. transformers' GGUF loader writes such files for byte-level
    models of the Llama architecture (SmolLM2 loaded with gguf_file=): with them transformers
    tokenizes a space as "▁", which such a vocabulary lacks, and llama.cpp's converter takes the
    SentencePiece path, where llama.cpp aborts on the missing byte pieces. The vocabulary and
    merges are kept; the pre-tokenizer is GPT-2's byte-level one, with digits split one by one
    where no token of the vocabulary holds two digits (as SmolLM2's pre-tokenizer does). The
    export's checks then compare llama.cpp's ids with these."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    vocab = model.get("vocab") or {}
    if (model.get("type") != "BPE" or not model.get("byte_fallback") or any(BYTE_PIECE.fullmatch(p) for p in vocab)
            or not {BYTE_LEVEL_SPACE, BYTE_LEVEL_NEWLINE} <= set("".join(vocab))):
        return None
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False))
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    digits_apart = not any(re.search(r"\d\d", piece) for piece in vocab)
    backend.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), level])
                             if digits_apart else level)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    added = sorted(state.get("added_tokens", []), key=lambda t: t["id"])
    backend.add_special_tokens([AddedToken(t["content"], special=t["special"], normalized=False) for t in added
                                if t["special"]])
    backend.add_tokens([AddedToken(t["content"], special=False, normalized=False) for t in added if not t["special"]])
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    rebuilt = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    rebuilt.chat_template = tokenizer.chat_template
    rebuilt.name_or_path = tokenizer.name_or_path
    rebuilt.init_kwargs["tokenizer_class"] = "GPT2Tokenizer"
    return rebuilt


def sentencepiece_model(tokenizer) -> bytes | None:
    """tokenizer.model for a SentencePiece vocabulary that only tokenizer.json holds (a byte-fallback
    BPE, as transformers 5 saves Llama 2, Mistral, Gemma and Phi-3 tokenizers), or None for any
    other vocabulary. llama.cpp's converter reads such vocabularies from tokenizer.model alone
    (Gemma, Phi-3) or first (Llama, whose tokenizer.json fallback gives every piece one score, so
    llama.cpp merges in another order). Pieces, ids and types are tokenizer.json's; a merged piece
    scores minus the rank of its first merge, the order in which both tokenizers merge. The
    export checks llama.cpp's token ids against the tokenizer's all the same."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    unknown = model.get("unk_token") or tokenizer.unk_token  # transformers 5 leaves Llama's out of the model
    spaces = _spaces(state)
    if (model.get("type") != "BPE" or not model.get("byte_fallback") or unknown not in model["vocab"]
            or spaces is None):
        return None
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    if [model["vocab"][p] for p in pieces] != list(range(len(pieces))):
        return None
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    rank = {}
    for i, (left, right) in enumerate(merges):
        rank.setdefault(left + right, i)
    added = {t["id"]: t for t in state.get("added_tokens", [])}
    # Only now: a byte-level vocabulary (the pipeline's own) needs no sentencepiece installed.
    from sentencepiece import sentencepiece_model_pb2 as sp

    kind = sp.ModelProto.SentencePiece.Type
    proto = sp.ModelProto()
    for i, piece in enumerate(pieces):
        if piece == unknown:
            type_, score = kind.UNKNOWN, 0.0
        elif i in added:
            type_, score = kind.CONTROL if added[i]["special"] else kind.USER_DEFINED, 0.0
        elif BYTE_PIECE.fullmatch(piece):
            type_, score = kind.BYTE, 0.0
        else:  # single characters, which no merge makes, score below every merged piece
            type_, score = kind.NORMAL, -float(rank.get(piece, len(merges) + i))
        proto.pieces.add(piece=piece, score=score, type=type_)
    proto.trainer_spec.model_type = sp.TrainerSpec.ModelType.BPE
    proto.trainer_spec.vocab_size = len(pieces)
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id = model["vocab"][unknown]
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = spaces
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    return proto.SerializeToString()


def _spaces(state: dict) -> bool | None:
    """How a tokenizer.json writes spaces, if as SentencePiece does (as "▁"): whether it also puts one
    before the text (SentencePiece's add_dummy_prefix: a Prepend normalizer, transformers' legacy
    Llama, or a Metaspace pre-tokenizer that prepends). None: not SentencePiece's way (byte-level)."""
    def parts(step: dict | None, key: str) -> list[dict]:
        return [] if step is None else step.get(key, [step])

    normalizers, pre = parts(state.get("normalizer"), "normalizers"), parts(state.get("pre_tokenizer"), "pretokenizers")
    metaspace = [p for p in pre if p.get("type") == "Metaspace"]
    if not metaspace and not any(n.get("type") == "Replace" and n.get("content") == "\u2581" for n in normalizers):
        return None
    return (any(n.get("type") == "Prepend" for n in normalizers)
            or any(p.get("prepend_scheme", "always") != "never" for p in metaspace))
