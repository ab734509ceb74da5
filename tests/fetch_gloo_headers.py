"""`make setup`: Gloo's C++ headers for the c10d shim (src/shim/dist.cpp), from Debian's libgloo-dev package.

    python tests/fetch_gloo_headers.py URL SHA256 DEST

libtorch has Gloo compiled in, but the torch wheel ships no Gloo headers. The .deb is fetched from the Debian
archive, checked against SHA256, and its usr/include/ extracted to DEST/include (only headers are used). Written with
the standard library alone (a .deb is an ar archive holding data.tar.*), so setup needs no dpkg.
"""
import hashlib
import io
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path


def ar_members(data):
    if not data.startswith(b"!<arch>\n"):
        raise SystemExit("not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        yield name, data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)


def main():
    url, sha256, dest = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    data = urllib.request.urlopen(url, timeout=120).read()
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise SystemExit(f"{url}: sha256 {got}, expected {sha256}")
    members = dict(ar_members(data))
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None:
        raise SystemExit(f"{url}: no data.tar member")
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
        raise SystemExit(f"{url}: no gloo/config.h in the package")
    shutil.rmtree(include, ignore_errors=True)
    if include.is_symlink():
        include.unlink()
    tmp.rename(include)
    print(f"Gloo headers in {include}")


if __name__ == "__main__":
    main()
