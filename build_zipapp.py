#!/usr/bin/env python3
"""Build ccmon.pyz: one file that runs ccmon on a machine with nothing but CPython.

    python build_zipapp.py [--output ccmon.pyz] [--python-version 3.12] [--platform manylinux2014_x86_64]

grpcio and protobuf's fast backend are C extensions, which Python cannot import from inside a zip.
The archive therefore carries the installed wheels for one target (CPython version, OS, architecture)
and, on first run, unpacks itself into a per-user cache folder named after the archive's content hash;
later runs import straight from there.

Why by hand rather than shiv or pex: shiv does this same unpack-to-cache dance, but neither tool is in
the standard library, and the build must run with only Python and pip (in the Docker build stage, on a
fresh box). What is left to write is small: `pip install --target`, a deterministic zip, and a
bootstrap of ~50 lines that takes a lock-free atomic rename to survive concurrent first runs.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
APP_FILES = ("ccmon.py", "ccmon_pb2.py", "ccmon_pb2_grpc.py")
EXTRAS = ("PyYAML==6.0.3", "tzdata==2026.6")  # pure-Python extras: YAML config and timezones everywhere
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: same inputs, same bytes
DROP_DIRS = {"__pycache__", "tests", "test"}
DROP_SUFFIXES = (".pyc", ".pyi", ".pxd", ".pyx")
DROP_DIST_INFO = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}  # vary by install, unused at run time

BOOTSTRAP = '''\
"""ccmon.pyz bootstrap: unpack once into a per-user cache keyed by the archive's content hash, then run."""
import os, shutil, stat, sys, tempfile, zipfile

BUILD_ID = "{build_id}"


def cache_roots():
    xdg = os.environ.get("XDG_CACHE_HOME")
    yield os.path.join(xdg or os.path.join(os.path.expanduser("~"), ".cache"), "ccmon")
    yield os.path.join(tempfile.gettempdir(), "ccmon-%s" % (os.getuid() if hasattr(os, "getuid") else "user"))


def private_folder(root):
    """Create root, or accept it only if it is ours and nobody else can write to it: code is imported from it."""
    os.makedirs(root, mode=0o700, exist_ok=True)
    info = os.lstat(root)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise OSError("not a plain folder")
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
        raise OSError("owned by another user or writable by others")


def unpack(archive):
    problems = []
    for root in cache_roots():
        target = os.path.join(root, BUILD_ID)
        staging = None
        try:
            private_folder(root)
            if os.path.isfile(os.path.join(target, ".complete")):
                return target
            staging = tempfile.mkdtemp(prefix=".unpack-", dir=root)
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if info.filename.startswith("app/"):
                        path = zf.extract(info, staging)
                        os.chmod(path, (info.external_attr >> 16) & 0o777 or 0o644)
            open(os.path.join(staging, "app", ".complete"), "w").close()
            try:
                os.rename(os.path.join(staging, "app"), target)  # atomic: one concurrent first run wins
            except OSError:
                if not os.path.isfile(os.path.join(target, ".complete")):
                    raise
            return target
        except (OSError, zipfile.BadZipFile) as exc:
            problems.append("%s: %s" % (root, getattr(exc, "strerror", None) or exc))
        finally:
            if staging:
                shutil.rmtree(staging, ignore_errors=True)
    sys.exit("ccmon: cannot unpack ccmon.pyz into a cache folder (%s); set XDG_CACHE_HOME to a writable "
             "folder of your own" % "; ".join(problems))


def main():
    sys.path.insert(0, unpack(os.path.dirname(os.path.abspath(__file__))))
    import ccmon
    sys.argv[0] = "ccmon"
    sys.exit(ccmon.main())


main()
'''


def pip_install(target: Path, requirements: list[str], python_version: str | None, platform: str | None) -> None:
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--disable-pip-version-check",
               "--only-binary=:all:", "--target", str(target)]
    if python_version or platform:
        command += ["--implementation", "cp"]
        if python_version:
            command += ["--python-version", python_version]
        if platform:
            command += ["--platform", platform]
    result = subprocess.run(command + requirements, capture_output=True, text=True)
    if result.returncode != 0:
        wanted = f"CPython {python_version or '%d.%d' % sys.version_info[:2]} on {platform or 'this platform'}"
        detail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "pip failed"
        sys.exit(f"build_zipapp: cannot get wheels for {wanted}: {detail}")


def runtime_requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")] + list(EXTRAS)


def kept(path: Path) -> bool:
    if DROP_DIRS.intersection(path.parts) or path.name.endswith(DROP_SUFFIXES):
        return False
    if path.parts[0] == "yaml" and path.name.startswith("_yaml."):
        return False  # PyYAML's optional C speedup: 0.8 MB for config parsing that takes microseconds
    return not (path.parent.name.endswith(".dist-info") and path.name in DROP_DIST_INFO)


def write_archive(output: Path, staging: Path) -> str:
    """A deterministic zip: sorted names, fixed dates and modes; returns the content hash."""
    files = sorted(p for p in staging.rglob("*") if p.is_file() and kept(p.relative_to(staging)))
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(staging)).encode() + b"\0" + path.read_bytes() + b"\0")
    build_id = digest.hexdigest()[:16]
    tmp = output.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        entry = zipfile.ZipInfo("__main__.py", ZIP_DATE)
        entry.external_attr = (stat.S_IFREG | 0o644) << 16
        archive.writestr(entry, BOOTSTRAP.format(build_id=build_id), zipfile.ZIP_DEFLATED)
        for path in files:
            name = "app/" + path.relative_to(staging).as_posix()
            entry = zipfile.ZipInfo(name, ZIP_DATE)
            mode = 0o755 if os.access(path, os.X_OK) and path.suffix == ".so" else 0o644
            entry.external_attr = (stat.S_IFREG | mode) << 16
            archive.writestr(entry, path.read_bytes(), zipfile.ZIP_DEFLATED)
    with open(tmp, "r+b") as handle:  # the shebang makes it directly executable where python3 is on PATH
        body = handle.read()
        handle.seek(0)
        handle.write(b"#!/usr/bin/env python3\n" + body)
    tmp.chmod(0o755)
    tmp.replace(output)
    return build_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", "-o", default=str(ROOT / "ccmon.pyz"), help="where to write (default ./ccmon.pyz)")
    parser.add_argument("--python-version", help="target CPython version, e.g. 3.12 (default: this interpreter's)")
    parser.add_argument("--platform", help="target pip platform tag, e.g. manylinux2014_aarch64 (default: this one)")
    args = parser.parse_args(argv)
    output = Path(args.output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ccmon-build-") as tmp:
        staging = Path(tmp)
        pip_install(staging, runtime_requirements(), args.python_version, args.platform)
        for name in APP_FILES:
            shutil.copy2(ROOT / name, staging / name)
        build_id = write_archive(output, staging)
    size = output.stat().st_size
    print(f"built {output} ({size / 1e6:.1f} MB, build {build_id}) for CPython "
          f"{args.python_version or '%d.%d' % sys.version_info[:2]} on {args.platform or 'this platform'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
