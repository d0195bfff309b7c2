#!/usr/bin/env bash
# Build the project's images where no container registry is in reach (this project's machines).
#
#   scripts/build_image.sh                          # fashion-mnist-serve:dev, with model_store/fashion_mnist.mar
#   scripts/build_image.sh --tag NAME:TAG           # another name, e.g. the Artifact Registry path
#   scripts/build_image.sh --mar PATH               # bake in another archive
#   scripts/build_image.sh --target runtime         # no archive inside: mount the model store at run time
#   scripts/build_image.sh --train                  # the training image (Dockerfile.train), fashion-mnist-train:dev
#
# 1. A wheelhouse with every package of docker/requirements.txt and docker/requirements-train.txt,
#    fetched (or, for source-only packages, built) by this host's pip, which reaches the indexes;
#    the images install from it with --no-index. The host must therefore run CPython 3.11 on
#    linux x86_64, like the images. Cached in build/wheelhouse/ until a requirements file changes.
#    Fetched in the background while step 2 runs: neither needs the other, and both take seconds.
# 2. The base image the Dockerfile's FROM names (debian:bookworm-slim), when the engine lacks it:
#    `debootstrap --variant=minbase bookworm`, trimmed like Debian's slim images, `docker import`ed
#    under that exact name. The root filesystem tarball is cached in build/base/.
# 3. `docker build --build-arg WHEELS=local`; the image the tag named before is removed once
#    nothing else uses it, so rebuilds do not pile up untagged images.
# With internet access, `docker build .` does the same with Docker Hub and the indexes
# (docs/deploy.md). Needs a running engine (scripts/ensure_dockerd.sh) and, for step 2, root.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=""
target=serve
dockerfile=Dockerfile
mar=model_store/fashion_mnist.mar
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || python=python3

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
while (($#)); do
    case "$1" in
    --tag) tag=$2; shift 2 ;;
    --target) target=$2; shift 2 ;;
    --mar) mar=$2; shift 2 ;;
    --train) dockerfile=Dockerfile.train; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "build_image.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
case "$target" in
serve | runtime) ;;
*) echo "build_image.sh: --target must be 'serve' (archive inside) or 'runtime' (archive mounted)" >&2; exit 2 ;;
esac
if [[ $dockerfile == Dockerfile.train ]]; then
    tag=${tag:-fashion-mnist-train:dev}
else
    tag=${tag:-fashion-mnist-serve:dev}
fi

if [[ $dockerfile == Dockerfile && $target == serve && ! -f $mar ]]; then
    echo "build_image.sh: $mar not found; build it with 'python -m archive.build'," \
        "or build without it: $0 --target runtime" >&2
    exit 1
fi

say() { printf '==> %s\n' "$*" >&2; }

if ! docker info >/dev/null 2>&1; then
    echo "build_image.sh: no Docker engine answers; start one with scripts/ensure_dockerd.sh" >&2
    exit 1
fi

# --- 1. wheelhouse (in the background) ----------------------------------------------------------
wheels=build/wheelhouse
want=$(cat docker/requirements.txt docker/requirements-train.txt | sha256sum | cut -d' ' -f1)
fetch_wheels() {
    say "fetching the wheels of docker/requirements*.txt into $wheels"
    rm -rf "$wheels" "$wheels.tmp"
    # --no-deps: the requirements pin every package, and the offline install in the image fails
    # loudly if one is missing.
    "$python" -m pip wheel --quiet --no-deps -r docker/requirements.txt -r docker/requirements-train.txt \
        --wheel-dir "$wheels.tmp" ||
        {
            echo "build_image.sh: pip wheel failed. torch==2.13.0+cpu comes from" \
                "https://download.pytorch.org/whl/cpu: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu $0" >&2
            exit 1
        }
    echo "$want" >"$wheels.tmp/.requirements.sha256"
    mv "$wheels.tmp" "$wheels"
}
wheels_pid=""
if [[ -f $wheels/.requirements.sha256 && $(cat "$wheels/.requirements.sha256") == "$want" ]]; then
    say "wheelhouse $wheels up to date"
else
    host=$("$python" -c 'import platform, sys; print(sys.implementation.name, *sys.version_info[:2], platform.system(), platform.machine())')
    if [[ $host != "cpython 3 11 Linux x86_64" ]]; then
        echo "build_image.sh: the wheelhouse needs CPython 3.11 on Linux x86_64 (the images'), this is $host;" \
            "set PYTHON, or build with internet access: docker build ." >&2
        exit 1
    fi
    fetch_wheels &
    wheels_pid=$!
fi

# --- 2. base image ------------------------------------------------------------------------------
base=$(sed -n 's/^FROM \([^ ]*\) AS venv$/\1/p' "$dockerfile")
base_tar=build/base/bookworm-minbase.tar

slim_rootfs() {  # what Debian's -slim images leave out: docs, man pages, translations, apt caches
    local root=$1
    cat >"$root/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
# Keep packages installed later as small as the base (copyright files stay).
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
EOF
    cat >"$root/etc/apt/apt.conf.d/slim" <<'EOF'
// No package cache in image layers: downloaded .debs are deleted, the binary caches never written.
Binary::apt::APT::Keep-Downloaded-Packages "false";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
EOF
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$root"/usr/share/{man,info,groff,lintian}/* "$root"/var/lib/apt/lists/* \
        "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*.log
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
    # Security fixes too, as in the images on Docker Hub.
    cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${mirror%/debian}/debian-security bookworm-security main
EOF
}

if docker image inspect "$base" >/dev/null 2>&1; then
    say "base image $base present"
else
    if [[ ! -f $base_tar ]]; then
        if [[ $(id -u) -ne 0 ]] || ! command -v debootstrap >/dev/null; then
            echo "build_image.sh: $base is missing and building it needs root and debootstrap" \
                "(apt-get install debootstrap); or pull it: docker pull $base" >&2
            exit 1
        fi
        say "creating $base with debootstrap from $mirror (about a minute)"
        mkdir -p build/base
        rootfs=$(mktemp -d build/base/rootfs.XXXXXX)
        trap 'rm -rf "$rootfs"' EXIT
        debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >build/base/debootstrap.log 2>&1 ||
            { echo "build_image.sh: debootstrap failed; see build/base/debootstrap.log" >&2; exit 1; }
        slim_rootfs "$rootfs"
        tar --numeric-owner -C "$rootfs" -cf "$base_tar.tmp" .
        mv "$base_tar.tmp" "$base_tar"
        rm -rf "$rootfs"
        trap - EXIT
    fi
    say "importing $base_tar as $base"
    docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' "$base_tar" "$base" >/dev/null
fi

if [[ -n $wheels_pid ]] && ! wait "$wheels_pid"; then
    exit 1  # fetch_wheels said why
fi

# --- 3. image -----------------------------------------------------------------------------------
args=(--file "$dockerfile" --build-arg WHEELS=local --tag "$tag")
if [[ $dockerfile == Dockerfile ]]; then
    args+=(--target "$target")
fi
if [[ $dockerfile == Dockerfile && $target == serve ]]; then
    # The build context only admits build/image/ (.dockerignore), wherever the archive comes from.
    mkdir -p build/image
    cp "$mar" build/image/fashion_mnist.mar
    args+=(--build-arg MAR=build/image/fashion_mnist.mar)
fi
old=$(docker image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
say "docker build ${args[*]} ."
docker build "${args[@]}" .
size=$(docker image inspect --format '{{.Size}}' "$tag")
say "built $tag: $((size / 1000000)) MB"
# A rebuild moves the tag, and the image it leaves untagged (about 1.2 GB) would pile up with every
# build. Remove it unless another tag or a container still uses it (then `docker image rm` refuses).
if [[ -n $old && $old != "$(docker image inspect --format '{{.Id}}' "$tag")" &&
    -z $(docker image inspect --format '{{join .RepoTags ""}}' "$old" 2>/dev/null) ]]; then
    if docker image rm "$old" >/dev/null 2>&1; then
        say "removed the image $tag pointed to before (${old:7:12}), now untagged"
    fi
fi
