"""Install time: llama.cpp built once, for the tools and the Python binding alike.

`python -m pipeline.llamacpp_build fetch` unpacks llama.cpp's source from the llama-cpp-python
source distribution (it carries the tree the binding is made for under vendor/llama.cpp), so that
the converter, the tools and the binding are one version. `python -m pipeline.llamacpp_build build`
runs one cmake build of that tree: the shared libraries the binding loads (libllama, libggml*) and
the tools the stages run (llama-server, llama-perplexity, llama-quantize, llama-imatrix), linked
against those same libraries. The build is kept in a cache outside the checkout, once per version,
flags and CPU; installing it copies the libraries into the binding's own `llama_cpp/lib` (where
its loader looks, and where pip's compile would have put them: `make install` installs the binding
with that compile switched off) and the tools beside them, linked from the environment's bin/.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from pipeline.artifacts import machine_cache
from pipeline.llamacpp import SOURCE_ENV, source_dir

# The tools the stages run.
TOOLS = ("llama-server", "llama-perplexity", "llama-quantize", "llama-imatrix")
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
               # Shared, as the binding needs them; every library and tool finds the others in its own
               # folder, wherever the folder is moved.
               "-DBUILD_SHARED_LIBS=ON", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN",
               # No network at build or run time: no HTTPS model downloads, no prebuilt web UI.
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
               # The build targets this CPU, and on a Xeon with AMX llama.cpp 0.3.36's AMX kernels
               # crash the process (SIGSEGV in ggml_backend_amx_mul_mat) on Q4_K files of the tiny
               # and default models: compile them out.
               *((f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}") if platform.machine() == "x86_64" else ()))
# llama.cpp's logger writes from a thread that exit does not wait for, so a tool's last lines are
# now and then lost (llama.cpp issue 22142; upstream flushes before exit tool by tool, PR 25504).
# The same one-line flush for llama-perplexity, whose closing summary the evaluate stage reads;
# {file: (text, text with the flush)}, applied to a copy of the source.
PATCHES = {"tools/perplexity/perplexity.cpp": ("\n    llama_backend_free();\n\n    return 0;\n}\n",
                                               "\n    common_log_flush(common_log_main());\n    llama_backend_free();\n\n"
                                               "    return 0;\n}\n")}


def fetch() -> Path:
    """Unpacks llama.cpp's source from llama-cpp-python's source distribution (pip's cache or the
    package index), once; the vocabulary test files and git data are left out."""
    from importlib import metadata

    target = source_dir()
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    version = metadata.version("llama-cpp-python")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", tmp], check=True)
        (archive,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        prefix = f"{archive.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and not m.name.startswith((prefix + "models/", prefix + ".git"))]
            tar.extractall(tmp, members=members, filter="data")
        os.replace(Path(tmp) / prefix, target)
    return target


def build_cache() -> Path:
    """Where builds are kept: keyed by the llama.cpp version, the build flags and this CPU (the build
    targets the CPU it runs on), so that a fresh checkout reuses an earlier build."""
    from importlib import metadata

    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    key = hashlib.sha256(json.dumps([CMAKE_FLAGS, TOOLS, PATCHES, platform.machine(), cpu,
                                     os.environ.get(SOURCE_ENV)]).encode())
    return machine_cache() / f"llama.cpp-{metadata.version('llama-cpp-python')}-{key.hexdigest()[:12]}"


def built_files(folder: Path) -> list[Path]:
    """The tools and every shared library of a build in `folder` (each library under its versioned
    names): the binding loads libllama and the libggml ones; the tools need those and their own
    (libllama-common, libllama-server-impl)."""
    return [folder / name for name in TOOLS] + sorted(folder.glob("lib*.so*"))


def binding_lib() -> Path:
    """The binding's own library folder, found without importing the binding (that loads the library)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llama-cpp-python is not installed in this environment: run `make install`.")
    return Path(spec.submodule_search_locations[0]) / "lib"


def compile_tree(out: Path) -> None:
    """One cmake build of the fetched source, patched, into `out`: the tools and the libraries."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        source, build_dir = Path(tmp) / "source", Path(tmp) / "build"
        shutil.copytree(fetch(), source)
        for name, (text, patched) in PATCHES.items():
            code = (source / name).read_text()
            if code.count(text) != 1:
                raise RuntimeError(f"{source / name} has changed: update pipeline/llamacpp_build.py's PATCHES for it.")
            (source / name).write_text(code.replace(text, patched))
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), *generator, *CMAKE_FLAGS], check=True,
                       stdout=subprocess.DEVNULL)
        # The tools, and libllama for the binding (the tools link it, but say so).
        subprocess.run(["cmake", "--build", str(build_dir), "--target", *TOOLS, "llama", "-j", str(os.cpu_count() or 1)],
                       check=True, stdout=subprocess.DEVNULL)
        (Path(tmp) / "bin").mkdir()
        for path in built_files(build_dir / "bin"):
            shutil.copy2(path, Path(tmp) / "bin" / path.name, follow_symlinks=False)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(Path(tmp) / "bin", out)


def install_into(folder: Path, files: list[Path]) -> None:
    """Copies `files` into `folder`, each replaced whole (a running process keeps the old one)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        partial = folder / f".{path.name}.partial"
        partial.unlink(missing_ok=True)
        shutil.copy2(path, partial, follow_symlinks=False)
        os.replace(partial, folder / path.name)


def build() -> Path:
    """Builds llama.cpp unless the cache has this build, then installs it: the libraries and the tools
    into the binding's library folder, and a link to each tool in the environment's bin/."""
    cache = build_cache()
    if not all((cache / name).is_file() for name in (*TOOLS, "libllama.so")):
        cache.parent.mkdir(parents=True, exist_ok=True)
        compile_tree(cache)
    lib, bin_dir = binding_lib(), Path(sys.prefix) / "bin"
    install_into(lib, built_files(cache))
    for name in TOOLS:
        link = bin_dir / f".{name}.partial"
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(lib / name, bin_dir))  # relative: the environment may move (an image's COPY)
        os.replace(link, bin_dir / name)
    return bin_dir


if __name__ == "__main__":
    commands = {"fetch": fetch, "build": build}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python -m pipeline.llamacpp_build {{{'|'.join(commands)}}}")
    print(commands[sys.argv[1]]())
