"""An output whose files changed after its stage wrote them is never read: each stage output lists its
files with their sizes, times and hashes (files.json), and every reader checks them first."""

import os

import pytest

from pipeline.artifacts import FILES, read_json
from tests.conftest import SMALL_CHAIN, only_dir, pipeline
from tests.test_preflight import one_line_error

pytestmark = pytest.mark.slow


def overwrite(path, at: int, size: int) -> None:
    """`size` bytes of `path` from offset `at` replaced, its length unchanged (bit rot, a bad copy)."""
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(os.urandom(size))


@pytest.mark.parametrize("stage, file, then", [
    # 100 kB of tensor data in a GGUF file, then its evaluation again.
    ("export", "trained/model-q8_0.gguf", "stage=[evaluate] rerun=[evaluate]"),
    # A safetensors shard of the trained model, then the GGUF export of it.
    ("train", "model.safetensors", "stage=[export] rerun=[export]"),
    # A metrics file, then the report that reads it.
    ("evaluate", "summary.json", "stage=[report]"),
])
def test_a_changed_output_stops_the_run_before_any_stage_reads_it(own_chain, stage, file, then):
    output = only_dir(own_chain / "artifacts" / stage)
    target = output / file
    if file.endswith(".json"):  # one digit of one figure
        text = target.read_text()
        at = text.index("0.")
        target.write_text(text[:at] + "1" + text[at + 1:])
    else:
        overwrite(target, target.stat().st_size // 2, min(100_000, target.stat().st_size // 4))
    expected = read_json(output / FILES)[file]["sha256"]
    later = sorted(p for p in (own_chain / "artifacts").rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in later}

    line = one_line_error(pipeline(own_chain, *SMALL_CHAIN, *then.split(), check=False))
    assert line.startswith(f"error: {target} changed after the {stage} stage wrote it (sha256 expected {expected}, found ")
    assert line.endswith(f"rerun=[{stage}] writes it again.")
    assert {p: p.stat().st_mtime_ns for p in later} == before  # nothing was written, nothing replaced


def test_verify_full_hashes_files_whose_size_and_time_stayed(own_chain):
    """A change that kept the file's size and modification time passes the quick check (which reads
    only those) and not verify=full, which hashes every file."""
    output = only_dir(own_chain / "artifacts" / "export")
    target = output / "trained" / "model-q4_k_m.gguf"
    stat = target.stat()
    overwrite(target, stat.st_size - 4096, 1024)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    pipeline(own_chain, *SMALL_CHAIN, "stage=[export]")  # reused: its files look as they were written
    line = one_line_error(pipeline(own_chain, *SMALL_CHAIN, "stage=[export]", "verify=full", check=False))
    assert line.startswith(f"error: {target} changed after the export stage wrote it")


def test_every_file_of_an_output_is_listed(chain):
    for stage in ("prepare", "train", "quantize", "export", "evaluate", "serve", "report"):
        output = only_dir(chain / "artifacts" / stage)
        listed = read_json(output / FILES)
        on_disk = {str(p.relative_to(output)) for p in output.rglob("*") if p.is_file() and p.name != FILES}
        assert set(listed) == on_disk, stage
        assert all(len(entry["sha256"]) == 64 and entry["bytes"] >= 0 for entry in listed.values())
