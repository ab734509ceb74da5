"""`make setup`: Gloo's C++ headers for the c10d shim (src/shim/dist.cpp), from Debian's libgloo-dev package.

    python tests/extract_gloo_headers.py DEB SHA256 DEST

libtorch has Gloo compiled in, but the torch wheel ships no Gloo headers. The Makefile fetches the .deb with Debian's
own client (`apt-get download libgloo-dev=VERSION`); this checks it against SHA256 and extracts its usr/include/ to
DEST/include (only headers are used). Written with the standard library alone (a .deb is an ar archive holding
data.tar.*), so setup needs no dpkg.
"""
import hashlib
import io
import shutil
import sys
import tarfile
from pathlib import Path


def ar_members(data, deb):
    if not data.startswith(b"!<arch>\n"):
        raise SystemExit(f"{deb}: not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        yield name, data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    deb, sha256, dest = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    try:
        data = deb.read_bytes()
    except OSError as e:
        raise SystemExit(f"{deb}: {e.strerror}")
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise SystemExit(f"{deb}: sha256 {got}, expected {sha256} (another build of the package, or another architecture)")
    members = dict(ar_members(data, deb))
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None:
        raise SystemExit(f"{deb}: no data.tar member")
    include = dest / "include"
    tmp = dest / "include.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(members[name]), mode="r:*") as tar:
        for m in tar.getmembers():
            path = m.name.lstrip("./")
            if m.isfile() and path.startswith("usr/include/"):
                out = tmp / path[len("usr/include/"):]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(m).read())
    if not (tmp / "gloo" / "config.h").exists():
        raise SystemExit(f"{deb}: no gloo/config.h in the package")
    if include.is_symlink():
        include.unlink()
    shutil.rmtree(include, ignore_errors=True)
    tmp.rename(include)
    print(f"Gloo headers in {include}")


if __name__ == "__main__":
    main()
