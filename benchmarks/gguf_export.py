"""The export stage's GGUF writer against llama.cpp's own converter (convert_hf_to_gguf.py).

Both convert the same trained checkpoint, each in a fresh process, timed by this command;
then the files are compared tensor by tensor: names, shapes, types, and bytes for F32, F16 and
Q8_0 (ours quantized by llama.cpp from our F32 file, theirs by gguf-py's numpy Q8_0, which is
byte-identical to llama.cpp's). Target: ours is no slower.

    python benchmarks/gguf_export.py [CHECKPOINT_DIR]

Without a directory it trains the offline default for a few steps first. The converter comes
from llama-cpp-python's source distribution (fetched by pip, from its cache when it has it).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.llamacpp import tensor_types  # noqa: E402

REPEATS = 3

OURS = """
import sys
from transformers import AutoTokenizer
from stages.export import quantize_gguf, write_gguf
source, out, dtype = sys.argv[1:4]
if dtype == "q8_0":  # llama.cpp's quantizer on our F32 file
    from pathlib import Path
    quantize_gguf(Path(source), Path(out), "q8_0")
else:
    write_gguf(source, AutoTokenizer.from_pretrained(source), out, dtype,
               {"name": "benchmark", "pre_tokenizer": "gpt-2"})
"""
# llama.cpp's converter recognises pre-tokenizers by hashing known tokenizers' output; a freshly
# trained tokenizer is unknown to it, so tell it what ours is (the same answer our exporter gives).
# It also tries a SentencePiece vocabulary first, which needs a package this project does not use.
THEIRS = """
import sys
sys.path.insert(0, sys.argv[1])
import convert_hf_to_gguf as c
from conversion.base import TextModel

def no_sentencepiece(self):
    raise FileNotFoundError

TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
TextModel._set_vocab_sentencepiece = no_sentencepiece
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
c.main()
"""


def converter(workdir: Path) -> Path:
    version = metadata.version("llama-cpp-python")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={version}", "-d", str(workdir)], check=True)
    (archive,) = workdir.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and
                   (m.name.endswith("convert_hf_to_gguf.py") or "/gguf-py/" in m.name or "/conversion/" in m.name)]
        tar.extractall(workdir, members=members, filter="data")
    (script,) = workdir.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py")
    return script.parent


def timed(args: list[str], repeats: int = 1) -> float:
    """Best wall time of `repeats` fresh processes (the least disturbed by the machine)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
        if result.returncode:
            sys.exit(result.stderr[-3000:])
        best = min(best, time.perf_counter() - started)
    return best


def compare(ours: Path, theirs: Path, check_bytes: bool) -> list[str]:
    import gguf
    import numpy as np

    a, b = tensor_types(ours), tensor_types(theirs)
    problems = [f"only in ours: {n}" for n in a.keys() - b.keys()] + [f"only in theirs: {n}" for n in b.keys() - a.keys()]
    problems += [f"{n}: ours {a[n]}, theirs {b[n]}" for n in a.keys() & b.keys() if a[n] != b[n]]
    if check_bytes:
        ra, rb = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(theirs))
        data_b = {t.name: t.data for t in rb.tensors}
        problems += [f"{t.name}: bytes differ" for t in ra.tensors
                     if t.name in data_b and not np.array_equal(np.asarray(t.data), np.asarray(data_b[t.name]))]
    return problems


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if len(sys.argv) > 1:
            checkpoint = Path(sys.argv[1]).resolve()
        else:
            subprocess.run([sys.executable, "-m", "pipeline", "stage=[prepare,train]", "train.precision=fp32",
                            "train.max_steps=10", "train.warmup_steps=2", f"paths.artifacts={tmp}/artifacts", f"tracking.uri=sqlite:///{tmp}/m.db",
                            f"tracking.artifact_location={tmp}/mlruns"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            (checkpoint,) = (tmp / "artifacts" / "train").iterdir()
        llama_cpp_dir = converter(tmp / "sdist")

        rows, problems = [], []
        for dtype in ("f32", "f16"):
            ours, theirs = tmp / f"ours-{dtype}.gguf", tmp / f"theirs-{dtype}.gguf"
            t_ours = timed(["-c", OURS, str(checkpoint), str(ours), dtype], REPEATS)
            t_theirs = timed(["-c", THEIRS, str(llama_cpp_dir), str(checkpoint), "--outtype", dtype, "--outfile", str(theirs)], REPEATS)
            rows.append((dtype, t_ours, t_theirs))
            problems += compare(ours, theirs, check_bytes=True)
        timed(["-c", OURS, str(tmp / "ours-f32.gguf"), str(tmp / "ours-q8_0.gguf"), "q8_0"])
        timed(["-c", THEIRS, str(llama_cpp_dir), str(checkpoint), "--outtype", "q8_0", "--outfile", str(tmp / "theirs-q8_0.gguf")])
        problems += compare(tmp / "ours-q8_0.gguf", tmp / "theirs-q8_0.gguf", check_bytes=True)

    print(f"\n{'file':<16}{'ours s':>9}{'llama.cpp s':>13}{'ratio':>8}   (target <= 1.0; best of {REPEATS} fresh processes)")
    for name, ours_s, theirs_s in rows:
        print(f"{name:<16}{ours_s:>9.2f}{theirs_s:>13.2f}{ours_s / theirs_s:>8.2f}")
    print("\ntensors (names, shapes, types, bytes for F32/F16/Q8_0): "
          + ("identical" if not problems else f"{len(problems)} differences:\n  " + "\n  ".join(problems[:20])))


if __name__ == "__main__":
    main()
