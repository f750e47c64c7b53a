"""prepare: deterministic split, a working tokenizer, token ids and hashes that match the files."""

import json
import re
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

from pipeline.artifacts import atomic_dir, read_json, sha256_file
from stages.prepare import load_documents, split
from tests.conftest import compose_with, only_dir, pipeline, refused, runs


@pytest.mark.slow
def test_pydoc_prepare_writes_hashed_split(run_pipeline, tmp_path):
    run_pipeline("stage=prepare")
    out = only_dir(tmp_path / "artifacts" / "prepare")
    manifest = read_json(out / "manifest.json")
    assert manifest["hashes"]["train_ids"] == sha256_file(out / "train.npy")
    assert manifest["hashes"]["heldout_ids"] == sha256_file(out / "heldout.npy")
    train, heldout = np.load(out / "train.npy"), np.load(out / "heldout.npy")
    assert len(train) == manifest["tokens"]["train"] > len(heldout) == manifest["tokens"]["heldout"] > 0
    # data.heldout_fraction of the documents (a quarter of the 79 pydoc topics), whole
    assert manifest["documents"] == {"heldout": 20, "train": 59}

    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert len(tokenizer) == manifest["vocab_size"] == 4096
    first_doc = json.loads((out / "heldout.jsonl").read_text().splitlines()[0])["text"]
    ids = tokenizer(first_doc, add_special_tokens=False)["input_ids"]
    assert heldout[: len(ids)].tolist() == ids and heldout[len(ids)] == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == first_doc  # byte-level BPE round-trips

    (prepare_run,) = runs(tmp_path, "prepare")
    assert prepare_run.data.tags["data_hash"] == manifest["data_hash"]
    assert prepare_run.data.metrics["prepare/heldout_tokens"] == len(heldout)


def test_split_is_seeded_disjoint_and_complete():
    docs = [f"document {i}" for i in range(50)]
    train, heldout = split(docs, 0.1, seed=0)
    assert split(docs, 0.1, seed=0) == (train, heldout)
    assert len(heldout) == 5 and not set(train) & set(heldout) and set(train) | set(heldout) == set(docs)
    assert split(docs, 0.1, seed=1)[1] != heldout


@pytest.mark.slow
def test_text_files_and_jsonl(run_pipeline, tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"Paragraph {i} about apples and pears." * 20 for i in range(20)))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": f"Line {i} of json text. " * 30}) + "\n" for i in range(20)))
    run_pipeline("stage=prepare", "data=text", "data.files=[a.txt,b.jsonl]", "data.text_field=body",
                 "data.seq_len=32", "model.arch.vocab_size=300")
    manifest = read_json(only_dir(tmp_path / "artifacts" / "prepare") / "manifest.json")
    assert manifest["documents"]["train"] + manifest["documents"]["heldout"] == 40


@pytest.mark.slow
def test_text_field_missing_names_the_fields(run_pipeline, tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"content": "x"}) + "\n" + json.dumps({"content": "y"}) + "\n")
    result = run_pipeline("stage=prepare", "data=text", "data.files=[b.jsonl]", check=False)
    assert result.returncode != 0 and "has no field 'text'" in result.stderr and "content" in result.stderr


def test_missing_text_file_fails_before_work(tmp_path):
    assert "'nope/*.txt' matches no file" in refused(tmp_path, "data=text", "data.files=[nope/*.txt]")


def test_files_as_windows_tools_write_them(tmp_path):
    """A UTF-8 BOM, CRLF line ends, blank and whitespace-only lines: as Windows editors, PowerShell
    and Excel's exports write them."""
    rows = [json.dumps({"text": f"Document {i}."}) for i in range(3)]
    (tmp_path / "w.jsonl").write_bytes(("\ufeff" + "\r\n".join([rows[0], "", rows[1], "  ", "\r", rows[2], ""])).encode())
    (tmp_path / "w.txt").write_bytes("\ufeffFirst paragraph,\r\nstill the first.\r\n\r\nSecond.\r\n \r\nThird.\r\n".encode())
    docs = load_documents(compose_with("data=text", f"data.files=[{tmp_path}/w.jsonl,{tmp_path}/w.txt]").data)
    assert docs == ["Document 0.", "Document 1.", "Document 2.", "First paragraph,\nstill the first.", "Second.", "Third."]
    assert not any("\ufeff" in d or "\r" in d for d in docs)


def test_broken_json_line_is_refused_with_its_line_in_the_file(tmp_path):
    lines = [json.dumps({"text": f"Document {i}."}) for i in range(10_000)]
    lines[99] = ""  # a blank line counts, as an editor counts it
    lines[7344] = '{"text": "Document 7344." "and more"}'
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    message = refused(tmp_path, "stage=prepare", "data=text", f"data.files=[{tmp_path}/big.jsonl]")
    assert message == (f"data.files: {tmp_path}/big.jsonl line 7345 is not valid JSON: Expecting ',' delimiter "
                       "(column 27).")

    # data=hf reads a local .jsonl file through datasets, whose error names neither the file nor the line
    message = refused(tmp_path, "stage=prepare", "data=hf", f"data.path={tmp_path}/big.jsonl")
    assert message.startswith(f"data.path: {tmp_path}/big.jsonl line 7345 is not valid JSON")
    # the same under a .json name, which datasets' json builder reads as JSON Lines too
    shutil.copy(tmp_path / "big.jsonl", tmp_path / "big.json")
    message = refused(tmp_path, "stage=prepare", "data=hf", f"data.path={tmp_path}/big.json")
    assert message.startswith(f"data.path: {tmp_path}/big.json line 7345 is not valid JSON")


def test_broken_data_files_that_datasets_reads_are_refused_in_one_line(tmp_path):
    """A .json file holding one document (an array of records) names its line; another format that
    datasets cannot read gives its reader's reason, not its traceback."""
    (tmp_path / "a.json").write_text('[{"text": "first"},\n {"text": "second"}\n {"text": "third"}]\n')
    message = refused(tmp_path, "stage=prepare", "data=hf", f"data.path={tmp_path}/a.json")
    assert message == (f"data.path: {tmp_path}/a.json is not valid JSON: Expecting ',' delimiter (line 3 column 2); "
                       "a .json file holds one JSON document or one JSON object a line.")
    (tmp_path / "a.json").write_text('[{"text": "first"},\n {"text": "second"}]\n')
    assert load_documents(compose_with("data=hf", f"data.path={tmp_path}/a.json").data) == ["first", "second"]
    (tmp_path / "a.csv").write_text('text,label\n"one,1\n')
    failed = pipeline(tmp_path, "stage=prepare", "model=tiny", "data=hf", f"data.path={tmp_path}/a.csv", check=False)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith(
        f"error: data.path: datasets' csv reader cannot read {tmp_path}/a.csv: ParserError: "), failed.stderr


@pytest.mark.parametrize("line, found", [("[1, 2]", "an array"), ("42", "a number"), ('"plain text"', "a string")])
def test_jsonl_line_that_is_no_object_is_refused(tmp_path, line, found):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "first"}) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=f"a.jsonl line 3 is {found}, not a JSON object: {re.escape(line)}$"):
        load_documents(compose_with("data=text", f"data.files=[{tmp_path}/a.jsonl]").data)


@pytest.mark.slow
def test_hf_dataset_directory(run_pipeline, tmp_path):
    import datasets

    rows = [{"text": f"Sample {i}: the quick brown fox jumps over the lazy dog. " * 10} for i in range(30)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    run_pipeline("stage=prepare", "data=hf", f"data.path={tmp_path}/ds", "data.seq_len=32", "model.arch.vocab_size=300")
    manifest = read_json(only_dir(tmp_path / "artifacts" / "prepare") / "manifest.json")
    assert manifest["documents"] == {"train": 27, "heldout": 3}

    result = run_pipeline("stage=prepare", "data=hf", f"data.path={tmp_path}/ds", "data.text_field=body", check=False)
    assert result.returncode != 0 and "data.text_field='body' is not a column" in result.stderr


def test_atomic_dir_keeps_the_old_output_on_failure(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (final / "weights").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
