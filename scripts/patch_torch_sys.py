"""Makes a copy of torch-sys's C++ wrappers compile against an older libtorch.

tch/torch-sys N.x wraps every ATen op of the libtorch it was generated for; an older libtorch lacks
a few (new ops, changed signatures). This copies torch-sys's source folder and replaces the body of
each generated wrapper that does not compile against the given libtorch headers by a C++ exception,
so calling it returns a tch error naming the op instead of failing the build. medgen calls none of
them; the list of stubbed wrappers is printed and written to STUBBED.txt in the copy.

usage: patch_torch_sys.py SRC DST LIBTORCH
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

GENERATED = "libtch/torch_api_generated.cpp"


def syntax_errors(dst: Path, libtorch: Path) -> set[int]:
    """Line numbers of the generated wrappers g++ rejects."""
    cmd = [
        "c++", "-fsyntax-only", "-std=c++17", "-D_GLIBCXX_USE_CXX11_ABI=1", "-DGLOG_USE_GLOG_EXPORT",
        "-w", "-fmax-errors=0",
        "-isystem", str(libtorch / "include"),
        "-isystem", str(libtorch / "include/torch/csrc/api/include"),
        "-I", str(dst / "libtch"), str(dst / GENERATED),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = set()
    for m in re.finditer(r"torch_api_generated\.cpp:(\d+):\d+: error:", r.stderr):
        lines.add(int(m.group(1)))
    if r.returncode != 0 and not lines:
        sys.exit(f"c++ failed without errors in the generated wrappers:\n{r.stderr[-3000:]}")
    return lines


def stub(dst: Path, bad_lines: set[int]) -> list[str]:
    path = dst / GENERATED
    src = path.read_text().split("\n")
    stubbed = []
    for line in sorted(bad_lines, reverse=True):
        i = line - 1
        start = i
        while start > 0 and not src[start].startswith("  PROTECT("):
            start -= 1
        end = i
        while end < len(src) and src[end] != "  )":
            end += 1
        head = src[start - 1]
        m = re.match(r"\S.*?\b(atg_\w+)\(", head)
        if not m or end >= len(src):
            sys.exit(f"{path}:{line}: not inside a generated PROTECT(...) block")
        name = m.group(1)
        if name in stubbed:
            continue
        msg = f"{name[4:]} is not in the libtorch this medgen was built against"
        src[start + 1:end] = [f'    throw std::runtime_error("{msg}");']
        stubbed.append(name)
    path.write_text("\n".join(src))
    return stubbed


def main():
    src, dst, libtorch = (Path(a) for a in sys.argv[1:4])
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    bad = syntax_errors(dst, libtorch)
    stubbed = stub(dst, bad)
    left = syntax_errors(dst, libtorch)
    if left:
        sys.exit(f"still not compiling after stubbing: lines {sorted(left)}")
    (dst / "STUBBED.txt").write_text("".join(f"{n}\n" for n in sorted(stubbed)))
    print(f"torch-sys for {libtorch}: {len(stubbed)} wrappers stubbed: {', '.join(sorted(stubbed))}")


if __name__ == "__main__":
    main()
