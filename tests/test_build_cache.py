"""The cached C++ extension is verified before it is loaded (issue 14: a truncated library killed the
process with SIGBUS, a stale one was reported available), and a build says so before it starts (issue 17).

The cases run on a stand-in extension (one small source, a header; it builds in seconds) in a temporary
TORCH_EXTENSIONS_DIR, never the shared cache; building and loading the real sources is
tests/test_kernels_build.py's. Whatever loads a library runs in a subprocess: a SIGBUS there fails one
test instead of ending pytest.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fastmaml import build

ROOT = build.CSRC.parent  # the source tree under test (the subprocesses import fastmaml from it)

LIBRARY_CPP = r"""
// The stand-in extension: inner_update with a CPU kernel, alpha_grad declared without one.
#include <torch/library.h>
#include "stand_in.h"
at::Tensor inner_update_cpu(const at::Tensor& phi, const at::Tensor& g, const at::Tensor& alpha) {
  return phi.sub(g.mul(alpha));
}
TORCH_LIBRARY(fastmaml, m) {
  m.def("inner_update(Tensor phi, Tensor g, Tensor alpha) -> Tensor");
  m.def("alpha_grad(Tensor g, Tensor v, Tensor alpha) -> Tensor");
}
TORCH_LIBRARY_IMPL(fastmaml, CPU, m) { m.impl("inner_update", &inner_update_cpu); }
"""

PRELUDE = """
import json, os, sys
from pathlib import Path
from fastmaml import build
build.CSRC = Path({csrc!r})
build.REQUIRED_OPS = {ops!r}
"""


def _csrc(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "library.cpp").write_text(LIBRARY_CPP)
    (folder / "stand_in.h").write_text("// a header: its digest is part of the manifest\n")
    return folder


def _run(code: str, ext_root: Path, csrc: Path, *, ops=("inner_update",), no_build=False, timeout=240):
    """Runs `code` after PRELUDE in a fresh interpreter; returns the CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if k != build.BUILD_ENV}
    env.update(TORCH_EXTENSIONS_DIR=str(ext_root), PYTHONPATH=str(ROOT))
    if no_build:
        env[build.BUILD_ENV] = "0"
    script = PRELUDE.format(csrc=str(csrc), ops=tuple(ops)) + code
    return subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(ROOT),
    )


def _library_dir(ext_root: Path) -> Path:
    (directory,) = ext_root.iterdir()
    return directory


def _notes(stderr: str):
    return [line for line in stderr.splitlines() if line.startswith("fastmaml:")]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """The stand-in built once, by `fastmaml build` in a fresh process (the one compile of this file)."""
    base = tmp_path_factory.mktemp("build_cache")
    csrc = _csrc(base / "csrc")
    proc = _run("from fastmaml import cli\nsys.exit(cli.main(['build']))", base / "ext", csrc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(csrc=csrc, root=base / "ext", stderr=proc.stderr, stdout=proc.stdout)


def _copy(stand_in, root: Path, csrc: Path = None) -> Path:
    """A copy of the built cache under TORCH_EXTENSIONS_DIR=root, in the folder that sources at `csrc`
    (default: the stand-in's) build into; modification times kept, as ninja judges by them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_EXTENSIONS_DIR", str(root))
        mp.setattr(build, "CSRC", csrc or stand_in["csrc"])
        shutil.copytree(_library_dir(stand_in["root"]), build.build_directory(False))
    return root


def test_a_build_says_so_first_in_one_line(stand_in):
    notes = _notes(stand_in["stderr"])
    assert len(notes) == 1, stand_in["stderr"]
    assert "building the C++ extension" in notes[0] and "FASTMAML_BUILD=0 skips it" in notes[0]
    assert "built" in stand_in["stdout"]


def test_the_manifest_records_the_library_and_its_sources(stand_in):
    directory = _library_dir(stand_in["root"])
    library = directory / f"{build.NAME}.so"
    manifest = json.loads(build.manifest_path(directory).read_text())
    assert manifest["size"] == library.stat().st_size
    assert manifest["sha256"] == build._sha256(library)
    assert sorted(manifest["sources"]) == ["library.cpp", "stand_in.h"]
    assert manifest["config"]["torch"] == build.torch.__version__
    assert not list(directory.glob("*.tmp"))  # the temporary file was renamed


@pytest.mark.parametrize("no_build", [False, True], ids=["build-allowed", "FASTMAML_BUILD=0"])
def test_a_verified_cache_loads_without_compiling_or_a_word(stand_in, tmp_path, no_build):
    root = _copy(stand_in, tmp_path / "ext")
    library = _library_dir(root) / f"{build.NAME}.so"
    before = library.stat()
    code = """
from torch.utils import cpp_extension
def no_compiling(*args, **kwargs):
    raise AssertionError("cpp_extension.load was called")
cpp_extension.load = no_compiling
import torch
ok, why = build.load()
assert ok, why
print(torch.ops.fastmaml.inner_update(torch.ones(2), torch.ones(2), torch.tensor(0.5)).tolist())
"""
    proc = _run(code, root, stand_in["csrc"], no_build=no_build)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[0.5, 0.5]"
    assert not _notes(proc.stderr), proc.stderr
    after = library.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


# Each damaged cache in FASTMAML_BUILD=0 mode: (damage, words the reason must contain). One process runs
# them all (through `registry.availability`, as `fastmaml info` and meta_step ask); the last one is
# loaded (dlopen refuses it), the others must be refused before any dlopen.
DAMAGE = {
    "truncated-1kB": "truncated (1024 of",
    "truncated-half": "is truncated",
    "garbage": "is corrupted",
    "no-manifest": "has no build manifest",
    "unreadable-manifest": "unreadable build manifest",
    "stale-source": "is stale (the sources changed since it was built: library.cpp)",
    "stale-header": "is stale (the sources changed since it was built: stand_in.h)",
    "other-flags": "is stale (built with another ldflags)",
    "garbage-with-its-manifest": "invalid ELF header",
}

DAMAGED_RUN = """
import torch
from torch import nn
import fastmaml
from fastmaml import cli
from fastmaml.models import conv4
from fastmaml.ops import registry
cases = json.loads({cases!r})
results = {{}}
for name, (root, csrc, ldflags) in cases.items():
    print("case", name, file=sys.stderr, flush=True)  # (the last one printed names a crash)
    os.environ["TORCH_EXTENSIONS_DIR"] = root
    build.CSRC, build.LINK_FLAGS, build._state = Path(csrc), ldflags, None
    ok, why = registry.availability("cpp", torch.device("cpu"))
    results[name] = [ok, why]
    if name == "truncated-1kB":  # what crashed in issue 14: `fastmaml info` and meta_step
        assert cli.main(["info"]) == 0
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
        batch = [torch.randn(4, 10, 1) for _ in range(4)]
        fastmaml.meta_step(model, tuple(batch), inner_lr=0.01, steps=1, loss="mse")
        conv = conv4(1, 5, hidden=8, image_size=28)
        sx, qx = torch.randn(2, 5, 1, 28, 28), torch.randn(2, 5, 1, 28, 28)
        sy = qy = torch.arange(5).repeat(2, 1)
        fastmaml.meta_step(conv, (sx, sy, qx, qy), inner_lr=0.01, steps=1, loss="cross_entropy")
print("RESULTS" + json.dumps(results))
"""


def _damage(case: str, directory: Path, csrc: Path) -> None:
    library, manifest = directory / f"{build.NAME}.so", build.manifest_path(directory)
    size = library.stat().st_size
    if case == "truncated-1kB":
        os.truncate(library, 1024)
    elif case == "truncated-half":
        os.truncate(library, size // 2)
    elif case == "garbage":
        library.write_bytes(os.urandom(size))
    elif case == "no-manifest":
        manifest.unlink()
    elif case == "unreadable-manifest":
        manifest.write_text(manifest.read_text()[:100])
    elif case == "stale-source":
        with open(csrc / "library.cpp", "a") as f:
            f.write("// edited after the build\n")
    elif case == "stale-header":
        with open(csrc / "stand_in.h", "a") as f:
            f.write("// edited after the build\n")
    elif case == "garbage-with-its-manifest":  # a manifest that vouches for it: the loader must refuse it
        library.write_bytes(b"not a shared library\n" * 100)
        record = json.loads(manifest.read_text())
        record.update(size=library.stat().st_size, sha256=build._sha256(library))
        manifest.write_text(json.dumps(record))


@pytest.fixture(scope="module")
def damaged(stand_in, tmp_path_factory):
    base = tmp_path_factory.mktemp("damaged")
    cases = {}
    for case in DAMAGE:
        csrc = base / case / "csrc"
        shutil.copytree(stand_in["csrc"], csrc)
        root = _copy(stand_in, base / case / "ext", csrc)
        _damage(case, _library_dir(root), csrc)
        ldflags = build.LINK_FLAGS + (["-Wl,-O1"] if case == "other-flags" else [])
        cases[case] = (str(root), str(csrc), ldflags)
    proc = _run(DAMAGED_RUN.format(cases=json.dumps(cases)), base / "unused", stand_in["csrc"], no_build=True)
    results = re.search(r"^RESULTS(.*)$", proc.stdout, re.M)
    return dict(proc=proc, results=json.loads(results.group(1)) if results else None, cases=cases)


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_cache_is_skipped_with_the_reason(damaged, case):
    proc = damaged["proc"]
    assert proc.returncode == 0 and damaged["results"], (
        f"exit {proc.returncode} (135/-7: SIGBUS):\n{proc.stderr[-3000:]}"
    )
    ok, why = damaged["results"][case]
    assert not ok, why
    library = _library_dir(Path(damaged["cases"][case][0])) / f"{build.NAME}.so"
    assert str(library) in why and DAMAGE[case] in why, why
    if case != "garbage-with-its-manifest":
        assert "run `fastmaml build`" in why, why


def test_info_reports_a_truncated_cache_instead_of_dying(damaged):
    proc = damaged["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"backend cpp +unavailable: the cached C\+\+ extension \S+ is truncated", proc.stdout)


def test_missing_ops_make_the_backend_unavailable_naming_them(stand_in, tmp_path):
    root = _copy(stand_in, tmp_path / "ext")
    code = """
ok, why = build.load()
assert not ok, why
print(why)
build._state = None  # once loaded, the next load() checks the ops again (the "already loaded" path)
ok, why = build.load()
assert not ok, why
print(why)
"""
    proc = _run(code, root, stand_in["csrc"], ops=("inner_update", "alpha_grad", "no_such_op"), no_build=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, again = proc.stdout.strip().splitlines()
    assert "lacks the ops alpha_grad, no_such_op" in first and str(_library_dir(root)) in first
    assert "lacks the ops alpha_grad, no_such_op" in again and "already loaded" in again


def test_a_truncated_cache_is_linked_again_when_building_is_allowed(stand_in, tmp_path):
    root = _copy(stand_in, tmp_path / "ext")
    directory = _library_dir(root)
    library, obj = directory / f"{build.NAME}.so", directory / "library.o"
    size, obj_mtime = library.stat().st_size, obj.stat().st_mtime_ns
    os.truncate(library, size // 2)
    code = """
ok, why = build.load()
assert ok, why
"""
    proc = _run(code, root, stand_in["csrc"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (note,) = _notes(proc.stderr)
    assert "linking the C++ extension again" in note and f"is truncated ({size // 2} of {size} bytes)" in note
    assert library.stat().st_size == size and obj.stat().st_mtime_ns == obj_mtime  # linked, not compiled
    manifest = json.loads(build.manifest_path(directory).read_text())
    assert manifest["sha256"] == build._sha256(library)


def test_a_killed_builds_lock_file_does_not_hang_the_next_build(stand_in, tmp_path):
    """A build killed mid-way leaves torch's `lock` file, for which torch's next build would wait forever."""
    root = _copy(stand_in, tmp_path / "ext")
    directory = _library_dir(root)
    library = directory / f"{build.NAME}.so"
    os.truncate(library, library.stat().st_size // 2)
    (directory / "lock").touch()
    proc = _run("ok, why = build.load()\nassert ok, why\n", root, stand_in["csrc"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (directory / "lock").exists()


def test_a_cache_that_cannot_be_rebuilt_is_skipped(stand_in, tmp_path):
    """A damaged library in a read-only cache (a read-only HOME) with building allowed: not loaded."""
    root = _copy(stand_in, tmp_path / "ext")
    directory = _library_dir(root)
    os.truncate(directory / f"{build.NAME}.so", 1024)
    code = """
os.access = lambda path, mode, **kwargs: False  # (read-only for root too)
ok, why = build.load()
assert not ok, why
print(why)
"""
    proc = _run(code, root, stand_in["csrc"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is truncated (1024 of" in proc.stdout and "not writable" in proc.stdout


# --- no loading below: in this process ---


def _fake_build(directory: Path, with_cuda=False):
    """A cache as a build leaves it (library bytes are never loaded here), for the current build.CSRC."""
    directory.mkdir(parents=True)
    (directory / f"{build.NAME}.so").write_bytes(b"\x7fELF" + b"x" * 1000)
    for source in build.sources(with_cuda):
        (directory / build._object_name(source, with_cuda)).write_bytes(b"object")
    build._write_manifest(directory, with_cuda, build.source_digests(with_cuda))


def _verdict(directory: Path):
    return build.verify(directory, False, build.source_digests(False))


def test_verify_names_what_to_recompile(monkeypatch, tmp_path):
    csrc = _csrc(tmp_path / "csrc")
    (csrc / "other.cpp").write_text("// a second source\n")
    monkeypatch.setattr(build, "CSRC", csrc)
    one, two, three = tmp_path / "one", tmp_path / "two", tmp_path / "three"
    _fake_build(one)
    assert _verdict(one) == (None, [])

    (csrc / "other.cpp").write_text("// edited\n")  # a source: its object only
    verdict = _verdict(one)
    assert "other.cpp" in verdict.problem and verdict.recompile == ["other.cpp"]
    build._invalidate(one, False, verdict)
    assert sorted(p.name for p in one.iterdir()) == ["library.o"]  # no library, manifest or other.o

    _fake_build(two)
    (csrc / "stand_in.h").write_text("// edited\n")  # a header: everything
    verdict = _verdict(two)
    assert "stand_in.h" in verdict.problem and verdict.recompile == ["*"]
    build._invalidate(two, False, verdict)
    assert not list(two.iterdir())

    _fake_build(three)
    monkeypatch.setattr(build, "LINK_FLAGS", build.LINK_FLAGS + ["-Wl,-O1"])  # other flags: everything
    assert _verdict(three) == ("is stale (built with another ldflags)", ["*"])


def test_without_the_sources_the_manifest_still_guards_the_library(monkeypatch, tmp_path):
    csrc = _csrc(tmp_path / "csrc")
    monkeypatch.setattr(build, "CSRC", csrc)
    directory = tmp_path / "ext"
    _fake_build(directory)
    assert build.verify(directory, False, None) == (None, [])
    os.truncate(directory / f"{build.NAME}.so", 10)
    assert "is truncated (10 of" in build.verify(directory, False, None).problem


def test_a_second_process_waits_for_the_build_and_says_so(tmp_path, capsys):
    import fcntl

    holder = os.open(tmp_path / ".fastmaml.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    threading.Timer(0.3, os.close, (holder,)).start()  # the other "process" finishes its build
    start = time.perf_counter()
    with build._directory_lock(tmp_path):
        waited = time.perf_counter() - start
    assert waited >= 0.2
    assert "waiting for another process building the C++ extension" in capsys.readouterr().err


def test_required_ops_are_the_ones_defined_and_called():
    """REQUIRED_OPS, the schemas csrc/library.cpp defines, and the ops the Python side calls agree."""
    defined = set(re.findall(r'm\.def\(\s*"(\w+)\(', (ROOT / "csrc" / "library.cpp").read_text()))
    called = set()
    for path in (ROOT / "fastmaml").rglob("*.py"):
        called.update(re.findall(r"torch\.ops\.fastmaml\.(\w+)", path.read_text()))
    assert defined == set(build.REQUIRED_OPS), defined ^ set(build.REQUIRED_OPS)
    assert called <= defined, called - defined


def test_each_source_tree_builds_in_its_own_folder(monkeypatch, tmp_path):
    """Two checkouts sharing one folder rebuilt each other's library (and could load it mid-link)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here = build.build_directory(False)
    monkeypatch.setattr(build, "CSRC", tmp_path / "another" / "checkout" / "csrc")
    there = build.build_directory(False)
    assert there != here and there.parent == here.parent == tmp_path
