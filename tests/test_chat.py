"""Instruction tuning: chat formats, the answer mask, packing, and the chat chain end to end."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.chat import CHATML, ChatDataError, conversation, tokenize_answers
from pipeline.data import load_sequences
from stages.prepare import train_tokenizer
from tests.conftest import FAST, pipeline, refused

END_OF_TURN = "<|im_end|>\n"
ANSWERS = ["Four.", "It returns a JSON string.", "Yes: `sorted(x, key=len)`."]
# One row of each format, holding the same conversation (the system prompt where the format has one).
ROWS = {
    "messages": ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
                               {"role": "assistant", "content": ANSWERS[0]}, {"role": "user", "content": "json.dumps?"},
                               {"role": "assistant", "content": ANSWERS[1]}]}, {}),
    "sharegpt": ({"conversations": [{"from": "human", "content": "2 + 2?"}, {"from": "gpt", "content": ANSWERS[0]},
                                    {"from": "human", "content": "json.dumps?"}, {"from": "gpt", "content": ANSWERS[1]}]},
                 {"format": "messages", "fields": {"messages": "conversations", "role": "from"}}),
    "prompt_completion": ({"prompt": "Sort by length?", "completion": ANSWERS[2], "system": "Be brief."}, {}),
    "prompt_completion_messages": ({"prompt": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Sort by length?"}],
                                    "completion": [{"role": "assistant", "content": ANSWERS[2]}]},
                                   {"format": "prompt_completion"}),
    "alpaca": ({"instruction": "Sort by length?", "input": "x = ['ab', 'c']", "output": ANSWERS[2]}, {}),
}


def data_config(name: str):
    overrides = ROWS[name][1]
    fields = {"messages": "messages", "role": "role", "content": "content", "prompt": "prompt", "completion": "completion",
              "instruction": "instruction", "input": "input", "output": "output", "system": "system",
              **overrides.get("fields", {})}
    return OmegaConf.create({"format": overrides.get("format", name), "fields": fields})


@pytest.fixture(scope="module")
def tokenizer():
    texts = ANSWERS + ["2 + 2? json.dumps? Sort by length? Be brief. user assistant system"] * 20
    return train_tokenizer(texts, 400, chat=True)


@pytest.mark.parametrize("name", list(ROWS))
def test_answer_mask_covers_exactly_the_assistant_tokens(tokenizer, name):
    row, _ = ROWS[name]
    messages = conversation(row, data_config(name), "row 0")
    ids, targets = tokenize_answers(tokenizer, messages, "row 0")
    # Independently of the code under test: where each answer's text, then the markup that ends
    # its turn, lies in the rendered conversation, by searching the rendered text.
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    expected_spans, at = [], 0
    for answer in [m["content"] for m in messages if m["role"] == "assistant"]:
        start = text.index(answer + END_OF_TURN, at)
        at = start + len(answer + END_OF_TURN)
        expected_spans.append((start, at))
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    expected = [any(s <= a and b <= e for s, e in expected_spans) for a, b in offsets]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert targets == expected
    # The targets decode to the answers, each with its end-of-turn token (so the model learns to stop).
    answers = "".join(m["content"] + END_OF_TURN for m in messages if m["role"] == "assistant")
    assert tokenizer.decode([i for i, t in zip(ids, targets) if t]) == answers
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in [i for i, t in zip(ids, targets) if t]


def test_rows_without_answers_or_fields_are_refused_by_name(tokenizer):
    config = data_config("messages")
    with pytest.raises(ChatDataError, match="data.jsonl:3 has no assistant message"):
        conversation({"messages": [{"role": "user", "content": "hi"}]}, config, "data.jsonl:3")
    with pytest.raises(ChatDataError, match="row 7: role 'robot'.*none of"):
        conversation({"messages": [{"role": "robot", "content": "hi"}]}, config, "row 7")
    with pytest.raises(ChatDataError, match="row 2 has no field 'output'.*fields: instruction"):
        conversation({"instruction": "x"}, data_config("alpaca"), "row 2")


def test_a_template_that_renders_no_answer_is_refused_naming_row_and_template(tokenizer):
    messages = conversation(ROWS["messages"][0], data_config("messages"), "row 0")
    tokenizer.chat_template = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    try:
        with pytest.raises(ChatDataError, match=r"row 0: the chat template renders no text for assistant message 2\. "
                                                r"Template: .*m\['role'\] != 'assistant'"):
            tokenize_answers(tokenizer, messages, "row 0")
    finally:
        tokenizer.chat_template = CHATML


def test_packing_keeps_whole_examples_and_attention_within_each(tmp_path, tokenizer):
    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM

    examples = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    np.save(tmp_path / "train.npy", np.array(sum(examples, []), dtype=np.int32))
    np.save(tmp_path / "train_targets.npy", np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=np.uint8))
    np.save(tmp_path / "train_lengths.npy", np.array([len(e) for e in examples], dtype=np.int32))
    packed = load_sequences(tmp_path, "train", 6, packing=True, pad_id=0)
    assert packed.ids.tolist() == [[5, 6, 7, 8, 9, 0], [10, 11, 12, 13, 14, 0]]
    assert packed.positions.tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1]]
    assert packed.real.sum().item() == 10 and packed.targets.sum().item() == 6
    single = load_sequences(tmp_path, "train", 6, packing=False, pad_id=0)
    assert len(single) == 4 and single.ids[1].tolist() == [8, 9, 0, 0, 0, 0]

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=16)).eval()
    with torch.no_grad():
        inputs = packed[:1].model_inputs(loss_on_all=False)
        together = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[0]
        apart = [model(input_ids=torch.tensor([e])).logits[0] for e in examples[:2]]
    # The second example's logits do not depend on the first one sharing its row.
    assert torch.allclose(together[3:5], apart[1], atol=1e-5)
    assert torch.allclose(together[:3], apart[0], atol=1e-5)


def test_loss_on_answers_needs_chat_data(tmp_path):
    assert "train.loss_on=assistant needs chat data" in refused(tmp_path, "train.loss_on=assistant")
    assert "data.source=stdlib holds conversations" in refused(tmp_path, "data=stdlib", "data.format=alpaca")


@pytest.mark.slow
def test_chat_default_runs_offline_with_answer_only_metrics(tmp_path):
    pipeline(tmp_path, "stage=all", *FAST, "train.precision=fp32", "data=stdlib", "quantize.methods=[rtn]",
             "export.sources=[trained]", "export.types=[q8_0]", "serve.llamacpp.files=[trained.q8_0]",
             "serve.load.levels=[1]", "serve.load.requests=4")
    artifacts = tmp_path / "artifacts"
    manifest = json.loads(next((artifacts / "prepare").glob("*/manifest.json")).read_text())
    counts = manifest["chat"]["splits"]
    assert manifest["format"] == "messages" and counts["train"]["target_tokens"] > 0
    assert counts["train"]["examples"] + counts["train"]["dropped_too_long"] == manifest["documents"]["train"]
    # The held-out conversations every later stage reads as rows are the ones whose ids it reads.
    prepared = next((artifacts / "prepare").glob("*"))
    assert len((prepared / "heldout.jsonl").read_text().splitlines()) == counts["heldout"]["examples"]
    train = json.loads(next((artifacts / "train").glob("*/summary.json")).read_text())
    assert train["loss_on"] == "assistant" and train["tokens_per_s"] > 0
    evaluation = next((artifacts / "evaluate").glob("*"))
    per_sequence = json.loads((evaluation / "per_sequence.json").read_text())
    assert per_sequence["scored"] == "answer tokens"
    # Answer tokens only: fewer than the real tokens of the held-out conversations.
    assert 0 < sum(per_sequence["tokens"]) < manifest["tokens"]["heldout"]
    summary = json.loads((evaluation / "summary.json").read_text())
    assert set(summary) == {"trained", "rtn", "trained.f16", "trained.q8_0"}
    assert all(s["tokens"] == sum(per_sequence["tokens"]) for s in summary.values())
    # llama-server renders every held-out prompt from the base file's embedded template (with Jinja, as
    # it serves) into the same tokens, and every other file carries that template.
    export = json.loads(next((artifacts / "export").glob("*/manifest.json")).read_text())
    for files in export.values():
        checked = files["f16"]["chat_template"]
        assert checked["same_prompt_tokens"] == checked["conversations"] > 0 and checked["renderer"] == "llama-server (Jinja)"
        assert len({info["chat_template_sha256"] for info in files.values()}) == 1
    served = json.loads(next((artifacts / "serve").glob("*/summary.json")).read_text())
    assert served["api"] == "chat" and served["results"]["trained.q8_0"]["status"] == "ok"
    report = next((artifacts / "report").glob("*/report.md")).read_text()
    assert "answer tokens of the held-out conversations" in report


def write_conversations(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
def test_jsonl_and_saved_dataset_train_on_a_checkpoint_with_its_own_template(tmp_path):
    """A local checkpoint with its own chat template: a JSONL file of conversations (LoRA, merged,
    exported with its template) and a save_to_disk dataset of Alpaca rows."""
    import datasets

    from tests.families import checkpoint

    model = checkpoint("qwen2.5", tmp_path / "qwen")
    (model / "chat_template.jinja").write_text(CHATML)
    rows = [{"messages": [{"role": "user", "content": f"What is {i} squared?"},
                          {"role": "assistant", "content": f"{i * i}, since {i} times {i} is {i * i}."}]}
            for i in range(40)]
    common = ["model=hf", f"model.name_or_path={model}", "train.max_steps=2", "train.warmup_steps=0",
              "train.eval_batches=1", "train.precision=fp32", "data.seq_len=64"]
    pipeline(tmp_path, "stage=[prepare,train,export]", *common, "data=text",
             f"data.files={write_conversations(tmp_path / 'chat.jsonl', rows)}", "data.format=messages",
             "model.lora.enabled=true", "export.sources=[trained]", "export.types=[q8_0]")
    train = json.loads(next((tmp_path / "artifacts" / "train").glob("*/summary.json")).read_text())
    assert train["loss_on"] == "assistant"
    trained = next((tmp_path / "artifacts" / "train").glob("*"))
    assert "<|im_start|>" in (trained / "chat_template.jinja").read_text()
    export = json.loads(next((tmp_path / "artifacts" / "export").glob("*/manifest.json")).read_text())
    assert export["trained"]["f16"]["chat_template"]["same_prompt_tokens"] == 4

    alpaca = [{"instruction": f"Square {i}.", "input": "", "output": str(i * i)} for i in range(40)]
    datasets.Dataset.from_list(alpaca).save_to_disk(str(tmp_path / "saved"))
    pipeline(tmp_path, "stage=[prepare,train]", *common, "data=hf", f"data.path={tmp_path / 'saved'}",
             "data.format=alpaca", "paths.artifacts=alpaca")
    manifest = json.loads(next((tmp_path / "alpaca" / "prepare").glob("*/manifest.json")).read_text())
    assert manifest["chat"]["splits"]["train"]["examples"] == manifest["documents"]["train"] == 36
    assert next((tmp_path / "alpaca" / "train").glob("*/model.safetensors")).exists()


@pytest.mark.slow
def test_data_with_no_answer_left_is_refused_before_training(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}] * 10
    result = pipeline(tmp_path, "stage=all", "profile=smoke", "data=text", "data.format=messages",
                      f"data.files={write_conversations(tmp_path / 'long.jsonl', rows)}", check=False)
    assert result.returncode == 1
    assert "No answer token is left to train on in the train split: 9 conversation(s), 9 longer than " \
           "data.seq_len=128 dropped" in result.stderr
    assert not (tmp_path / "artifacts" / "train").exists()
