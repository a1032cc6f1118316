"""Building and loading the C++ extension: the `fastmaml build` command, the cache location, and
clear reasons (never a broken `import fastmaml`) when the build cannot happen."""

import subprocess
import sys

import pytest

from fastmaml import build, cli


def test_build_command_prebuilds(capsys):
    assert cli.main(["build"]) == 0
    out = capsys.readouterr().out
    assert "built" in out and "fastmaml_ext" in out
    directory = build.build_directory(build.cuda_enabled())
    assert directory.is_dir()
    # verified next time (tests/test_build_cache.py), and every op the Python side calls is there
    assert build.verify(directory, build.cuda_enabled(), build.source_digests(build.cuda_enabled())).problem is None
    assert build.missing_ops() == []


def test_building_twice_loads_one_library():
    """A second build() in the process finds the same flags and library (no `_v1` copy to load)."""
    flags = list(build.LINK_FLAGS)
    first, second = build.build(), build.build()
    assert first == second and build.LINK_FLAGS == flags
    assert not list(first.parent.glob(f"{build.NAME}_v*.so"))


def test_cache_location_follows_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build.build_directory(False).parent == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert build.build_directory(False).parts[-3:-1] == (".cache", "fastmaml")


def test_no_build_mode_without_cache_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with pytest.raises(build.BuildError, match="fastmaml build"):
        build._load_cached()


def test_compiler_error_becomes_build_error(monkeypatch, tmp_path):
    broken = tmp_path / "csrc"
    broken.mkdir()
    (broken / "broken.cpp").write_text("this is not C++ {\n")
    monkeypatch.setattr(build, "CSRC", broken)
    # its own name: cpp_extension counts versions per name in the process, and a later build of the
    # real sources under the same name would load a second copy of the library
    monkeypatch.setattr(build, "NAME", "fastmaml_ext_broken_test")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with pytest.raises(build.BuildError, match="building the fastmaml C\\+\\+ extension failed"):
        build.build()


def test_failed_build_keeps_import_working_and_info_says_why(tmp_path):
    """In a fresh process whose sources are missing: import works, auto falls back, info explains."""
    code = f"""
import fastmaml.build as b
from pathlib import Path
b.CSRC = Path({str(tmp_path / "nowhere")!r})
import fastmaml, torch
from fastmaml.ops import registry
ok, why = registry.availability("cpp", torch.device("cpu"))
assert not ok and "missing" in why, why
assert registry.resolve("auto", "cpu").chosen["inner_update"][0] == "torch"
try:
    registry.resolve("cpp", "cpu")
except fastmaml.BackendUnavailable as exc:
    assert "missing" in str(exc)
else:
    raise AssertionError("backend='cpp' should raise")
from fastmaml import cli
cli.main(["info"])
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(build.CSRC.parent),
            "HOME": str(tmp_path),
        },
    )
    assert proc.returncode == 0, proc.stderr
    assert "backend cpp     unavailable" in proc.stdout and "missing" in proc.stdout


CHECKED_OP = r"""
#include <ATen/ATen.h>
#include <torch/library.h>
at::Tensor checked(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.sizes() == b.sizes(), "b: expected shape ", a.sizes(), ", got ", b.sizes());
  return a + b;
}
TORCH_LIBRARY(fastmaml_link_test, m) { m.def("checked(Tensor a, Tensor b) -> Tensor"); }
TORCH_LIBRARY_IMPL(fastmaml_link_test, CPU, m) { m.impl("checked", &checked); }
"""


def test_error_messages_survive_a_statically_linked_libstdcxx(tmp_path):
    """With a compiler that links libstdc++ statically (as the GPU machine's does), the extension's
    link flags keep its TORCH_CHECK messages whole: without them the number formatting in a message
    broke (cut short at the first number on this CPU machine, a crash on the GPU machine)."""
    (tmp_path / "checked.cpp").write_text(CHECKED_OP)
    code = f"""
import torch
from torch.utils import cpp_extension
cpp_extension.load(name="fastmaml_link_test", sources=[{str(tmp_path / "checked.cpp")!r}],
                   extra_ldflags={build.LINK_FLAGS + ["-static-libstdc++"]!r}, is_python_module=False,
                   build_directory={str(tmp_path)!r})
try:
    torch.ops.fastmaml_link_test.checked(torch.ones(2, 3), torch.ones(2, 2))
except RuntimeError as exc:
    print(str(exc).splitlines()[0])
"""
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "b: expected shape [2, 3], got [2, 2]", proc.stdout
