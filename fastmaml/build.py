"""Builds and loads the optional C++/CUDA extension in `csrc/` (`torch.ops.fastmaml.*`).

Compiled with `torch.utils.cpp_extension.load(..., is_python_module=False)` and ninja at first use
(or ahead of time with `fastmaml build`), cached under `$TORCH_EXTENSIONS_DIR/fastmaml-...` or
`~/.cache/fastmaml/...`. The CUDA sources are added only where `cpp_extension.CUDA_HOME` is set
(a CUDA build of torch with nvcc). A failed build is remembered with its reason: the "cpp" backend
then reports itself unavailable and `auto` falls back to the reference.

A cached library is verified before it is loaded: each build writes a manifest next to it
(`fastmaml_ext.manifest.json`: the library's size and sha256, the sha256 of every source and header,
the torch version and the build flags). A library without a manifest, of another size or hash (an
interrupted build or copy: dlopen of a truncated library kills the process with SIGBUS) or built
from other sources or flags is never loaded: it is rebuilt, or with `FASTMAML_BUILD=0` skipped with
the reason. After loading, every op of `REQUIRED_OPS` must be registered, else the backend is
unavailable and the reason names the missing ops.

A build prints one line to stderr before it starts (it takes about a minute); loading a verified
cache prints nothing.

Environment: `FASTMAML_BUILD=0` never compiles (only a verified build already in the cache is loaded).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock
    fcntl = None  # type: ignore[assignment]


def _find_csrc() -> Path:
    """`fastmaml/csrc` in an installed wheel (package data), else `csrc/` of the source tree."""
    here = Path(__file__).resolve().parent
    installed = here / "csrc"
    return installed if installed.is_dir() else here.parent / "csrc"


CSRC = _find_csrc()
NAME = "fastmaml_ext"
BUILD_ENV = "FASTMAML_BUILD"
MANIFEST_FORMAT = 1

# every op the Python side calls (fastmaml/ops/backends/cpp.py); csrc/library.cpp defines them, and
# tests/test_build_cache.py checks that the three lists agree
REQUIRED_OPS = (
    "inner_update",
    "adjoint_update",
    "alpha_grad",
    "mlp_meta_step",
    "bn_relu_maxpool_fwd",
    "bn_relu_maxpool_bwd",
    "bn_relu_maxpool_tangent_fwd",
    "bn_relu_maxpool_tangent_bwd",
    "bn_act_fwd",
    "bn_act_bwd",
    "bn_act_tangent_fwd",
    "bn_act_tangent_bwd",
    "conv_bn_relu_maxpool_fwd",
    "conv_bn_relu_maxpool_bwd",
    "conv_bn_relu_maxpool_tangent_fwd",
    "conv_bn_relu_maxpool_tangent_bwd",
    "relu_maxpool_fwd",
)

# --exclude-libs,ALL: a compiler that links libstdc++ statically (the GPU machine's /opt/gcc g++ does)
# would otherwise export that copy's symbols, and the loader binds some of them to the process's own
# libstdc++ (its locale facet ids, for one): every TORCH_CHECK message that formats a number then
# crashed the process there (and was cut short here). Hidden, the private copy is self-consistent;
# with a shared libstdc++ (the usual case) the flag changes nothing.
LINK_FLAGS = ["-Wl,--exclude-libs,ALL"]

_lock = threading.Lock()
_state: Optional[Tuple[bool, str]] = None  # (loaded, reason) once load() was attempted


class BuildError(RuntimeError):
    """The extension could not be compiled or loaded; the message says why."""


def cuda_enabled() -> bool:
    """Whether the CUDA sources are part of the build (a CUDA torch with `CUDA_HOME`)."""
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None


def sources(with_cuda: bool) -> List[str]:
    """C++ sources always; `csrc/cuda/*.cu` and `csrc/cuda/*.cpp` (torch-facing registration) with CUDA."""
    if not CSRC.is_dir():
        raise BuildError(f"the C++ sources are missing: {CSRC} is not a directory")
    files = sorted(CSRC.glob("*.cpp"))
    if with_cuda:
        files += sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "cuda").glob("*.cpp"))
    return [str(f) for f in files]


def headers_digest() -> str:
    """A short digest of every header under csrc/."""
    digest = hashlib.sha256()
    for h in sorted(CSRC.rglob("*.h")):
        digest.update(h.read_bytes())
    return digest.hexdigest()[:16]


def build_directory(with_cuda: bool) -> Path:
    """One folder per torch installation (version and path) and source tree: two environments with the
    same torch version (a virtual environment and the system Python) compile with different include
    paths, and two checkouts (a copy, a worktree, an older commit) with different sources; sharing a
    folder would make each rebuild the other's extension, or load it while the other relinks it."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "fastmaml"
    torch_dir = Path(torch.__file__).resolve().parent
    where = hashlib.sha256(f"{torch_dir}\n{CSRC.resolve()}".encode()).hexdigest()[:8]
    tag = f"torch{torch.__version__}".replace("+", "_") + f"-{where}"
    return root / f"{NAME}-{tag}-{'cuda' if with_cuda else 'cpu'}"


def _library_path(with_cuda: bool) -> Path:
    return build_directory(with_cuda) / f"{NAME}.so"


def manifest_path(directory: Path) -> Path:
    """The build manifest next to the library (written after each successful build)."""
    return directory / f"{NAME}.manifest.json"


def _flags(with_cuda: bool) -> Dict[str, Optional[List[str]]]:
    # the C++ standard is torch's choice (C++17 up to 2.12, C++20 after); the headers' digest is a
    # define so that editing a header alone also triggers a rebuild (load() hashes only sources)
    # -fopenmp: at::parallel_for is an inline template that runs serially unless the extension itself
    # is compiled with OpenMP (the runtime symbols resolve to the libgomp torch already loaded)
    # (fresh lists on each call: load() appends to extra_ldflags, and changed flags would make a second
    # build() in the process load a second copy of the library under a new version name)
    define = f"-DFASTMAML_HEADERS_DIGEST={headers_digest()}"
    return {
        "cflags": ["-O3", "-fopenmp", define],
        "cuda_cflags": ["-O3", define] if with_cuda else None,
        "ldflags": list(LINK_FLAGS),
    }


def _config(with_cuda: bool) -> Dict[str, object]:
    """What the library depends on besides the sources; any change means a rebuild."""
    return {
        "torch": torch.__version__,
        "torch_path": str(Path(torch.__file__).resolve().parent),
        "torch_cuda": torch.version.cuda,
        "with_cuda": with_cuda,
        **_flags(with_cuda),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:  # read(), never mmap: a truncated file just reads short
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_digests(with_cuda: bool) -> Dict[str, str]:
    """sha256 of each file the build reads: the sources compiled and every header under csrc/."""
    files = {Path(s) for s in sources(with_cuda)}
    files.update(f for pattern in ("*.h", "*.cuh", "*.hpp") for f in CSRC.rglob(pattern))
    return {f.relative_to(CSRC).as_posix(): _sha256(f) for f in sorted(files)}


class Verdict(NamedTuple):
    """Whether a cached library may be loaded. `problem` is None for a verified one, else a phrase
    ("is truncated (...)"); `recompile` names the sources whose objects are out of date (`["*"]`: all,
    `[]`: only the library itself has to be linked again)."""

    problem: Optional[str]
    recompile: List[str]


def _names(items: List[str], most: int = 4) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def verify(directory: Path, with_cuda: bool, digests: Optional[Dict[str, str]]) -> Verdict:
    """Checks the library in `directory` against its manifest and, unless `digests` is None (the
    sources are not there), against the current sources and build configuration. Reads files only
    (never loads the library)."""
    library = directory / f"{NAME}.so"
    if not library.is_file():
        return Verdict("does not exist", ["*"])
    try:
        manifest = json.loads(manifest_path(directory).read_text())
        expected_size, expected_sha = int(manifest["size"]), str(manifest["sha256"])
        built_sources, built_config = dict(manifest["sources"]), dict(manifest["config"])
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
    except FileNotFoundError:
        return Verdict("has no build manifest (an interrupted build, a copy, or a build by an older fastmaml)", ["*"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Verdict(f"has an unreadable build manifest ({type(exc).__name__}: {exc})", ["*"])
    size = library.stat().st_size
    if size < expected_size:
        return Verdict(f"is truncated ({size} of {expected_size} bytes)", [])
    if size != expected_size:
        return Verdict(f"is not the library that was built ({size} bytes, built {expected_size})", [])
    if _sha256(library) != expected_sha:
        return Verdict("is corrupted (its sha256 differs from the one recorded at build time)", [])
    config = _config(with_cuda)
    if digests is None:  # no sources: nor their headers' digest in the flags to compare
        for key in ("cflags", "cuda_cflags"):
            config.pop(key)
            built_config.pop(key, None)
    flags = sorted(k for k in set(config) | set(built_config) if config.get(k) != built_config.get(k))
    if digests is not None and digests != built_sources:
        changed = sorted(k for k in set(digests) | set(built_sources) if digests.get(k) != built_sources.get(k))
        # a header can reach every source; a changed or new source only needs its own object
        everything = flags or any(not k.endswith((".cpp", ".cu")) for k in changed)
        return Verdict(
            f"is stale (the sources changed since it was built: {_names(changed)})", ["*"] if everything else changed
        )
    if flags:
        return Verdict(f"is stale (built with another {_names(flags)})", ["*"])
    return Verdict(None, [])


def _write_manifest(directory: Path, with_cuda: bool, digests: Dict[str, str]) -> None:
    """Records the freshly built library; written to a temporary file and renamed (atomic)."""
    library = directory / f"{NAME}.so"
    manifest = {
        "format": MANIFEST_FORMAT,
        "library": library.name,
        "size": library.stat().st_size,
        "sha256": _sha256(library),
        "sources": digests,
        "config": _config(with_cuda),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{NAME}.manifest.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # (mkstemp makes it private; the library next to it is readable by all)
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, manifest_path(directory))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _object_name(source: str, with_cuda: bool) -> str:
    """The object file cpp_extension (ninja) compiles a source to, in the build directory."""
    stem, ext = os.path.splitext(os.path.basename(source))
    return f"{stem}.cuda.o" if ext == ".cu" and with_cuda else f"{stem}.o"


def _invalidate(directory: Path, with_cuda: bool, verdict: Verdict) -> None:
    """Removes the manifest, the library and the out-of-date objects, so that ninja (which goes by
    modification times only) compiles what changed and links a new library."""
    doomed = [manifest_path(directory), directory / f"{NAME}.so"]
    if verdict.recompile == ["*"]:
        doomed += list(directory.glob("*.o"))
    else:
        doomed += [directory / _object_name(s, with_cuda) for s in verdict.recompile]
    for path in doomed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[bool]:
    """An exclusive lock (flock) on the build directory while its library is checked, built and loaded,
    so that one process does not load a library another one is relinking; yields whether it holds it
    (not where the directory is read-only, where nobody can rebuild either, or without fcntl)."""
    fd, locked = None, False
    if fcntl is not None:
        lock = directory / ".fastmaml.lock"
        for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
            try:
                fd = os.open(lock, flags, 0o666)
                break
            except OSError:
                continue
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                print(
                    f"fastmaml: waiting for another process building the C++ extension in {directory}",
                    file=sys.stderr,
                    flush=True,
                )
                fcntl.flock(fd, fcntl.LOCK_EX)
                locked = True
            except OSError:
                pass  # a file system without locks: go on unlocked
        yield locked
    finally:
        if fd is not None:
            os.close(fd)


def missing_ops() -> List[str]:
    """The ops of `REQUIRED_OPS` that are not registered with a CPU kernel (all, before loading)."""
    missing = []
    for op in REQUIRED_OPS:
        name = f"fastmaml::{op}"
        if not torch._C._jit_get_schemas_for_operator(name) or not torch._C._dispatch_has_kernel_for_dispatch_key(
            name, "CPU"
        ):
            missing.append(op)
    return missing


def _ops_registered() -> bool:
    """Whether a fastmaml library is loaded in this process (by us or by someone else)."""
    return bool(torch._C._jit_get_schemas_for_operator("fastmaml::inner_update"))


def _check_ops(what: str) -> None:
    missing = missing_ops()
    if missing:
        raise BuildError(
            f"{what} lacks the ops {', '.join(missing)} (a library built from other sources); run `fastmaml build`"
        )


def _load_verified(path: Path) -> None:
    try:
        torch.ops.load_library(str(path))
    except OSError as exc:  # the loader's own complaint is the cause ("...: invalid ELF header")
        cause = str(exc.__cause__ or exc).strip().splitlines()[0]
        raise BuildError(f"the C++ extension {path} could not be loaded ({cause}); run `fastmaml build`") from exc
    _check_ops(f"the C++ extension {path}")


def _say(message: str) -> None:
    print(f"fastmaml: {message}", file=sys.stderr, flush=True)


def _announcement(directory: Path, verdict: Verdict) -> str:
    """The one line printed before a build: what happens, for how long, and why."""
    skip = f"{BUILD_ENV}=0 skips it"
    if verdict.problem == "does not exist":
        return f"building the C++ extension in {directory} (once, about a minute; {skip})"
    if not verdict.recompile:
        what = "linking the C++ extension again (a few seconds)"
    elif verdict.recompile == ["*"]:
        what = f"rebuilding the C++ extension (about a minute; {skip})"
    else:
        what = f"recompiling {_names(verdict.recompile)} of the C++ extension (under a minute; {skip})"
    return f"{what}: the cached library {directory / f'{NAME}.so'} {verdict.problem}"


def build(verbose: bool = False) -> Path:
    """Loads the cached library if it verifies, else compiles (what changed) and loads the extension;
    returns the library path.

    Raises BuildError with the compiler's complaint on failure.
    """
    from torch.utils import cpp_extension

    with_cuda = cuda_enabled()
    directory = build_directory(with_cuda)
    digests = source_digests(with_cuda)  # (raises BuildError when the sources are missing)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(
            f"cannot create the build directory {directory} ({exc}); set TORCH_EXTENSIONS_DIR "
            f"to a writable folder, or ${BUILD_ENV}=0 to run without the extension"
        ) from exc
    path = directory / f"{NAME}.so"
    with _directory_lock(directory) as locked:
        verdict = verify(directory, with_cuda, digests)
        if verdict.problem is None:
            _load_verified(path)
            return path
        if not os.access(directory, os.W_OK):
            raise BuildError(
                f"the cached C++ extension {path} {verdict.problem}, and {directory} is not "
                f"writable to rebuild it; set TORCH_EXTENSIONS_DIR to a writable folder"
            )
        _say(_announcement(directory, verdict))
        _invalidate(directory, with_cuda, verdict)
        if locked:  # torch's lock file of a build that was killed (torch would wait for it forever): stale,
            # since no other process builds here while this one holds the directory's lock
            with contextlib.suppress(FileNotFoundError):
                (directory / "lock").unlink()
        flags = _flags(with_cuda)
        try:
            loaded = cpp_extension.load(
                name=NAME,
                sources=sources(with_cuda),
                extra_cflags=flags["cflags"],
                extra_cuda_cflags=flags["cuda_cflags"],
                extra_ldflags=flags["ldflags"],
                build_directory=str(directory),
                with_cuda=with_cuda,
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as exc:  # compiler errors arrive as RuntimeError / CalledProcessError
            raise BuildError(f"building the fastmaml C++ extension failed in {directory}: {exc}") from exc
        # (a second build in one process with other flags loads `NAME_v1.so`: no manifest for that one)
        if isinstance(loaded, str) and Path(loaded).resolve() == path.resolve():
            _write_manifest(directory, with_cuda, digests)
        _check_ops(f"the C++ extension {loaded}")
    return path


def _load_cached() -> Path:
    """`FASTMAML_BUILD=0`: loads the cached library only if it verifies, else raises BuildError saying why."""
    with_cuda = cuda_enabled()
    path = _library_path(with_cuda)
    if not path.exists():
        raise BuildError(f"${BUILD_ENV}=0 and no prebuilt extension at {path}; run `fastmaml build`")
    try:
        digests: Optional[Dict[str, str]] = source_digests(with_cuda)
    except BuildError:
        digests = None  # no sources to compare with (nothing could rebuild it either): the manifest decides
    with _directory_lock(path.parent):
        verdict = verify(path.parent, with_cuda, digests)
        if verdict.problem is not None:
            raise BuildError(
                f"the cached C++ extension {path} {verdict.problem}; not loaded (${BUILD_ENV}=0): run `fastmaml build`"
            )
        _load_verified(path)
    return path


def load() -> Tuple[bool, str]:
    """Loads the extension once per process (building it if needed); returns (ok, reason)."""
    global _state
    with _lock:
        if _state is None:
            try:
                if _ops_registered():
                    path = "already loaded"
                    _check_ops("the fastmaml library already loaded in this process")
                elif os.environ.get(BUILD_ENV, "1") == "0":
                    path = _load_cached()
                else:
                    path = build()
                _state = (True, f"C++ extension loaded ({path})")
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [repr(exc)])[0][:500]
                if "run `fastmaml build`" not in first:
                    first += " (`fastmaml build --verbose` shows the compiler output)"
                _state = (False, first)
        return _state
