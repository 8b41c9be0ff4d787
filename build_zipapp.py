#!/usr/bin/env python3
"""Build ccmon.pyz: one file that runs ccmon on a machine with nothing but CPython.

    python build_zipapp.py [--output ccmon.pyz] [--python-version 3.12] [--platform manylinux2014_aarch64]

grpcio and protobuf's fast backend are C extensions, which Python cannot import from inside a zip.
The archive therefore carries installed wheels and, on first run, unpacks itself into a per-user cache
folder named after the archive's content hash; later runs import straight from there.

By default it carries them for every CPython ccmon supports (PYTHONS) on this OS and architecture, so
the one file runs wherever any of those does. The installs for different versions differ only in a few
files (grpcio's `cygrpc` extension and wheel metadata; protobuf's extension is abi3): the archive keeps
what they share once under app/ and what differs under cp311/, cp312/, ..., and the first run unpacks
app/ plus the folder that fits the interpreter. Any other interpreter gets a one-line refusal.

Why by hand rather than shiv or pex: shiv does this same unpack-to-cache dance, but neither tool is in
the standard library, and the build must run with only Python and pip (in the Docker build stage, on a
fresh box). What is left to write is small: `pip install --target`, a deterministic zip, and a
bootstrap of ~120 lines that takes a lock-free atomic rename to survive concurrent first runs.
"""
from __future__ import annotations

import argparse
import filecmp
import hashlib
import os
import platform
import re
import stat
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
APP_FILES = ("ccmon.py", "ccmon_pb2.py", "ccmon_pb2_grpc.py", "dashboard.html", "dashboard.js", "dashboard.css")
PYTHONS = ("3.11", "3.12", "3.13", "3.14")  # every CPython ccmon supports: tomllib needs 3.11
EXTRAS = ("PyYAML==6.0.3", "tzdata==2026.6")  # pure-Python extras: YAML config and timezones everywhere
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: same inputs, same bytes
DROP_DIRS = {"__pycache__", "tests", "test"}
DROP_SUFFIXES = (".pyc", ".pyi", ".pxd", ".pyx")
DROP_DIST_INFO = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}  # vary by install, unused at run time

# The bootstrap keeps to syntax and modules that every Python 3 has (checked back to 3.6), so that an
# interpreter ccmon cannot run on still gets as far as the one-line refusal.
BOOTSTRAP = '''\
"""ccmon.pyz bootstrap: check that this Python fits, unpack once into a per-user cache keyed by the archive's
content hash (removing all but the two newest builds there), then run ccmon. Claude Code's status line and
--format may be answered before any of that, by the quick route (quick_answer). Modules are imported where they
are used: the quick route's whole time is a status line's."""
import os, sys

VERSION = {version!r}
BUILD_ID = {build_id!r}
TARGET_PYTHONS, TARGET_PLATFORM = {pythons!r}, {platform!r}
# Per CPython version: the file-name suffixes of the extension modules it unpacks. An interpreter can import
# them only if it accepts every one (importlib.machinery.EXTENSION_SUFFIXES), which checks the Python version,
# OS, architecture, C library and free-threading in one go.
SUFFIXES = {suffixes!r}


def fitting_version():
    """The version folder (cp312) whose files this interpreter can import, or None."""
    from importlib.machinery import EXTENSION_SUFFIXES
    tag = "cp%d%d" % sys.version_info[:2]
    return tag if tag in SUFFIXES and set(SUFFIXES[tag]) <= set(EXTENSION_SUFFIXES) else None


def this_python():
    """This interpreter and machine, for the refusal."""
    where = "%s %s" % (os.uname().sysname, os.uname().machine) if hasattr(os, "uname") else sys.platform
    if sys.platform.startswith("linux"):  # manylinux wheels need glibc, musllinux ones musl
        try:
            where += " (%s)" % (os.confstr("CS_GNU_LIBC_VERSION") or "no glibc")
        except (ValueError, OSError):
            where += " (no glibc)"
    name = "CPython" if sys.implementation.name == "cpython" else sys.implementation.name
    free_threaded = "t" if "t" in getattr(sys, "abiflags", "") else ""  # needs extensions of its own
    return "%s %d.%d%s on %s" % (name, sys.version_info[0], sys.version_info[1], free_threaded, where)


def cache_roots():
    xdg = os.environ.get("XDG_CACHE_HOME")
    yield os.path.join(xdg or os.path.join(os.path.expanduser("~"), ".cache"), "ccmon")
    import tempfile
    yield os.path.join(tempfile.gettempdir(), "ccmon-%s" % (os.getuid() if hasattr(os, "getuid") else "user"))


def private_folder(root):
    """Create root, or accept it only if it is ours and nobody else can write to it: code is imported from it."""
    os.makedirs(root, mode=0o700, exist_ok=True)
    check_private(root)


def check_private(root):
    """Raise OSError unless root is a plain folder of ours that nobody else can write to."""
    import stat
    info = os.lstat(root)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise OSError("not a plain folder")
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
        raise OSError("owned by another user or writable by others")


def remove_old_builds(root):
    """Keep the two newest unpacked builds, so a server still running the previous one keeps its files.

    Only folders named like a build id are ours to remove, never the one in use; cleanup never fails the run."""
    import re, shutil
    try:
        builds = [name for name in os.listdir(root) if re.match(r"[0-9a-f]{{16}}$", name)]
        builds.sort(key=lambda name: os.path.getmtime(os.path.join(root, name)), reverse=True)
        for name in builds[2:]:
            if name != BUILD_ID:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    except OSError:
        pass


def compile_bytecode(folder):
    """Compile every module once, here: each later run imports the bytecode instead of compiling ccmon, grpc and
    protobuf again (200 ms of a status line's start), even where PYTHONDONTWRITEBYTECODE is set. Unchecked: the
    folder is named after the archive's content, so its sources never change under their bytecode. A file that
    does not compile (none should) is left to import as source."""
    import compileall, py_compile
    compileall.compile_dir(folder, quiet=2, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)


def unpack(archive, version):
    """The folder holding this build for this Python version (root/BUILD_ID/cp312), unpacked on first use."""
    import shutil, tempfile, zipfile
    problems = []
    for root in cache_roots():
        target = os.path.join(root, BUILD_ID, version)
        staging = None
        try:
            private_folder(root)
            if os.path.isfile(os.path.join(target, ".complete")):
                return target
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=".unpack-", dir=root)
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    folder, _, name = info.filename.partition("/")
                    if folder in ("app", version):  # what all versions share, and this version's own files
                        path = os.path.join(staging, *name.split("/"))
                        os.makedirs(os.path.dirname(path), exist_ok=True)
                        with zf.open(info) as source, open(path, "wb") as copy:
                            shutil.copyfileobj(source, copy)
                        os.chmod(path, (info.external_attr >> 16) & 0o777 or 0o644)
            compile_bytecode(staging)
            open(os.path.join(staging, ".complete"), "w").close()
            try:
                os.rename(staging, target)  # atomic: one concurrent first run wins
            except OSError:
                if not os.path.isfile(os.path.join(target, ".complete")):
                    raise
            else:
                staging = None
                remove_old_builds(root)
            return target
        except (OSError, zipfile.BadZipFile) as exc:
            problems.append("%s: %s" % (root, getattr(exc, "strerror", None) or exc))
        finally:
            if staging:
                shutil.rmtree(staging, ignore_errors=True)
    if sys.argv[1:2] == ["statusline"]:  # Claude Code shows what it prints: never a blank status line
        print("ccmon: cannot unpack ccmon.pyz (set XDG_CACHE_HOME to a writable folder of your own)")
    sys.exit("ccmon: cannot unpack ccmon.pyz into a cache folder (%s); set XDG_CACHE_HOME to a writable "
             "folder of your own" % "; ".join(problems))


ROUTES = "quick-routes.json"  # in this build's cache folder (root/BUILD_ID): a new build starts without routes


def quick_answer():
    """The status line or a --format line as the server renders it (ccmon's POST /api/statusline and /api/format),
    with nothing of ccmon's loaded: how to ask was written by the last full run of the same command with this build
    (ccmon's QuickRoute), and holds while the CCMON_ variables, HOME, the config files and the folder it looked in
    are as they were then. True once the line is printed; False sends the command on to ccmon, with what was read
    of stdin put back: whatever goes wrong here, the full run still gives the line."""
    import json
    received = b""
    try:
        route = None
        for root in cache_roots():
            try:
                check_private(root)  # a route names the server that gets stdin: from a folder only we can write
                with open(os.path.join(root, BUILD_ID, ROUTES)) as routes:
                    route = json.load(routes).get(json.dumps(sys.argv[1:]))
                break
            except (OSError, ValueError, AttributeError):
                continue
        environment = dict((name, value) for name, value in os.environ.items()
                           if name.startswith("CCMON_") or name == "HOME")  # ccmon's route_environment
        if not isinstance(route, dict) or route["env"] != environment or \\
                route["folder"] not in (None, os.getcwd()) or \\
                any(file_stamp(path) != stamp for path, stamp in route["files"].items()):
            return False
        body = dict(route["body"])
        if route["stdin_wait_s"] is not None:  # the status line's input, read as ccmon reads it
            if os.isatty(0):
                return False
            received = read_stdin(route["stdin_wait_s"], route["stdin_max"])
            if len(received) > route["stdin_limit"]:  # more than the page takes: ccmon says what it is
                put_back_stdin(received)
                return False
            body["input"] = received.decode("utf-8", "replace")
        answer = ask_server(route, json.dumps(body).encode())
        if not isinstance(answer, dict) or not isinstance(answer.get("line"), str):
            put_back_stdin(received)
            return False
    except Exception:  # a route of another shape, a folder gone, no server: the full run
        put_back_stdin(received)
        return False
    try:  # output that cannot be written ends it as ccmon's main() does
        if answer.get("problem"):
            sys.stderr.write(str(answer["problem"]).translate(CONTROL_ESCAPES) + "\\n")
        sys.stdout.write(answer["line"].translate(CONTROL_ESCAPES) + "\\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    except OSError as exc:  # a full disk
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.exit("ccmon: cannot write the output: %s" % exc.strerror)
    return True


# As ccmon's printable: what a server answers reaches the terminal with each control character as its escape
CONTROL_ESCAPES = dict((code, "\\\\x%02x" % code) for code in list(range(0x20)) + list(range(0x7f, 0xa0)))


def file_stamp(path):
    """As ccmon's file_stamp: [mtime in ns, size], None when absent."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_mtime_ns, info.st_size]


def read_stdin(wait_s, limit):
    """As ccmon's read_json_object: what arrives until it holds one whole JSON object, it ends, wait_s passes or
    more than limit bytes have come (stdin may be left open)."""
    import json, select, time
    deadline, received = time.monotonic() + wait_s, b""
    while len(received) <= limit:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([0], [], [], left)[0]:
            break
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        received += chunk
        if received.rstrip().endswith(b"}}"):
            try:
                json.JSONDecoder().raw_decode(received.decode("utf-8", "replace").lstrip())
                break
            except (ValueError, RecursionError):
                pass
    return received


def put_back_stdin(received):
    """Make what was read of stdin what ccmon reads there: the same bytes, then the end. Unable to, ccmon finds
    stdin as this left it."""
    if received:
        try:
            import tempfile
            with tempfile.TemporaryFile() as copy:
                copy.write(received)
                copy.flush()
                copy.seek(0)
                os.dup2(copy.fileno(), 0)
        except OSError:
            pass


def ask_server(route, body):
    """POST body to the route's URL over HTTP/1.1 (TLS and token as ccmon's client has them), all of it within the
    wait for the server; the answer's JSON when it is 200 OK, else None."""
    import json, socket, time
    scheme, _, rest = route["url"].partition("://")
    address, _, path = rest.partition("/")
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + route["wait_s"]

    def left():
        return max(deadline - time.monotonic(), 0.001)

    connection = socket.create_connection((host.strip("[]"), int(port)), timeout=left())
    try:
        if scheme == "https":
            import ssl
            tls = route["tls"]
            context = ssl.create_default_context(cafile=tls["ca"])
            if tls["cert"]:
                context.load_cert_chain(tls["cert"], tls["key"])
            connection.settimeout(left())
            connection = context.wrap_socket(connection, server_hostname=tls["server_name"] or host.strip("[]"))
        head = ("POST /%s HTTP/1.1\\r\\nHost: %s\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\n"
                "Connection: close\\r\\n" % (path, address, len(body)))
        if route["token"]:
            head += "Authorization: Bearer %s\\r\\n" % route["token"]
        connection.settimeout(left())
        connection.sendall(head.encode("utf-8") + b"\\r\\n" + body)
        answer = b""
        while len(answer) < 1 << 20:  # until the server closes the connection, as asked
            connection.settimeout(left())
            chunk = connection.recv(1 << 16)
            if not chunk:
                break
            answer += chunk
    finally:
        connection.close()
    head, _, payload = answer.partition(b"\\r\\n\\r\\n")
    status = head.split(b" ", 2)[1:2]
    return json.loads(payload.decode("utf-8")) if status == [b"200"] else None


def main():
    version = fitting_version()  # before importing anything an unfit interpreter may lack
    if version is None:
        sys.exit("ccmon: this ccmon.pyz is for %s on %s; this is %s" % (TARGET_PYTHONS, TARGET_PLATFORM,
                                                                         this_python()))
    if sys.argv[1:] in (["--version"], ["-v"]):  # answered from the build's own facts: no unpacking, no grpc
        print("ccmon %s (build %s, %s, %s)" % (VERSION, BUILD_ID, TARGET_PYTHONS, TARGET_PLATFORM))
        return
    if (sys.argv[1:2] == ["statusline"] or "--format" in sys.argv) and quick_answer():
        return
    folder = unpack(os.path.dirname(os.path.abspath(__file__)), version)  # root/BUILD_ID/cp312
    sys.path.insert(0, folder)
    import ccmon
    sys.argv[0] = "ccmon"
    sys.exit(ccmon.main(quick_routes=os.path.join(os.path.dirname(folder), ROUTES)))


main()
'''


def this_platform() -> str:
    """This machine as a pip platform tag; on Linux the widest-reaching one wheels carry (glibc 2.17+, or musl)."""
    tag = sysconfig.get_platform().replace("-", "_").replace(".", "_")  # linux_x86_64, macosx_11_0_arm64, win_amd64
    if tag.startswith("linux_"):
        tag = ("manylinux2014" if platform.libc_ver()[0] == "glibc" else "musllinux_1_2") + tag[len("linux"):]
    return tag


def pip_install(target: Path, requirements: list[str], python_version: str, platform_tag: str) -> None:
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--disable-pip-version-check",
               "--only-binary=:all:", "--target", str(target), "--implementation", "cp",
               "--python-version", python_version, "--platform", platform_tag]
    result = subprocess.run(command + requirements, capture_output=True, text=True)
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "pip failed"
        sys.exit(f"build_zipapp: cannot get wheels for CPython {python_version} on {platform_tag}: {detail}")


def runtime_requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")] + list(EXTRAS)


def kept(path: Path) -> bool:
    if DROP_DIRS.intersection(path.parts) or path.name.endswith(DROP_SUFFIXES):
        return False
    if path.parts[0] == "yaml" and path.name.startswith("_yaml."):
        return False  # PyYAML's optional C speedup: 0.8 MB for config parsing that takes microseconds
    return not (path.parent.name.endswith(".dist-info") and path.name in DROP_DIST_INFO)


def archive_files(installs: dict[str, Path]) -> dict[str, Path]:
    """Zip name -> file, sorted: what every install has byte for byte once under app/, the rest under its cp3XX/."""
    trees = {tag: {p.relative_to(root).as_posix(): p for p in root.rglob("*")
                   if p.is_file() and kept(p.relative_to(root))} for tag, root in installs.items()}
    files = {f"app/{name}": ROOT / name for name in APP_FILES}
    for tag, tree in trees.items():
        for name, path in tree.items():
            shared = all(name in other and filecmp.cmp(path, other[name], shallow=False) for other in trees.values())
            files[f"app/{name}" if shared else f"{tag}/{name}"] = path
    return dict(sorted(files.items()))


def extension_suffixes(files: dict[str, Path], tag: str) -> list[str]:
    """The file-name suffixes (.cpython-312-x86_64-linux-gnu.so, .abi3.so) of the extension modules tag unpacks."""
    names = [name.rsplit("/", 1)[1] for name in files
             if name.startswith(("app/", f"{tag}/")) and name.endswith((".so", ".pyd"))]
    return sorted({name[name.index("."):] for name in names})


def content_id(files: dict[str, Path], facts: str) -> str:
    """The build id: a hash of every file's name and bytes and of what the build is for."""
    digest = hashlib.sha256(facts.encode() + b"\0")
    for name, path in files.items():
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def write_archive(output: Path, bootstrap: str, files: dict[str, Path]) -> None:
    """A deterministic zip: sorted names, fixed dates and modes, behind a shebang."""
    tmp = output.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        entry = zipfile.ZipInfo("__main__.py", ZIP_DATE)
        entry.external_attr = (stat.S_IFREG | 0o644) << 16
        archive.writestr(entry, bootstrap, zipfile.ZIP_DEFLATED)
        for name, path in files.items():
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", "-o", default=str(ROOT / "ccmon.pyz"), help="where to write (default ./ccmon.pyz)")
    parser.add_argument("--python-version", choices=PYTHONS,
                        help=f"carry only this CPython version (default: all of {', '.join(PYTHONS)})")
    parser.add_argument("--platform", help="target pip platform tag, e.g. manylinux2014_aarch64 (default: this "
                                           "OS and architecture, manylinux2014 on glibc Linux)")
    args = parser.parse_args(argv)
    output = Path(args.output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    versions = [args.python_version] if args.python_version else list(PYTHONS)
    pythons = f"CPython {versions[0]}" + (f"-{versions[-1]}" if len(versions) > 1 else "")
    platform_tag = args.platform or this_platform()
    version = re.search(r'^VERSION = "([^"]+)"$', (ROOT / "ccmon.py").read_text(), re.M).group(1)
    with tempfile.TemporaryDirectory(prefix="ccmon-build-") as tmp:
        installs = {}
        for python in versions:
            installs["cp" + python.replace(".", "")] = target = Path(tmp, python)
            pip_install(target, runtime_requirements(), python, platform_tag)
        files = archive_files(installs)
        build_id = content_id(files, f"{version}, {pythons}, {platform_tag}")
        suffixes = {tag: extension_suffixes(files, tag) for tag in installs}
        write_archive(output, BOOTSTRAP.format(version=version, build_id=build_id, pythons=pythons,
                                               platform=platform_tag, suffixes=suffixes), files)
    print(f"built {output} ({output.stat().st_size / 1e6:.1f} MB, build {build_id}) for {pythons} on {platform_tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
