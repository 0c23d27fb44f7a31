# shellcheck shell=bash
# Shared helpers of the host side of the rig: messages, exit codes, sizes,
# privilege and apt handling. Sourced by tests/rig/run.

# Exit codes of tests/rig/run (documented in tests/rig/README.md).
# shellcheck disable=SC2034  # used by tests/rig/run
readonly RIG_EXIT_USAGE=2
readonly RIG_EXIT_SETUP=3
readonly RIG_EXIT_TIMEOUT=124
readonly RIG_EXIT_CRASH=125
readonly RIG_EXIT_INTERRUPTED=130

rig_t0=${EPOCHREALTIME}

# Seconds since the rig started, one decimal.
rig_elapsed() {
    local now=${EPOCHREALTIME}
    awk -v a="$rig_t0" -v b="$now" 'BEGIN { printf "%.1f", b - a }'
}

# Seconds between two $EPOCHREALTIME values, one decimal.
rig_delta() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

say() { printf 'rig: %s\n' "$*" >&2; }
warn() { printf 'rig: warning: %s\n' "$*" >&2; }
# Verbose messages (--verbose).
debug() { if [[ ${RIG_VERBOSE:-0} == 1 ]]; then printf 'rig: + %s\n' "$*" >&2; fi; }

# die CODE MESSAGE...
die() {
    local code=$1
    shift
    printf 'rig: error: %s\n' "$*" >&2
    exit "$code"
}
usage_error() { die "$RIG_EXIT_USAGE" "$*" "(see tests/rig/run --help)"; }
setup_error() { die "$RIG_EXIT_SETUP" "$*"; }

# Parse a size such as 2G, 512M, 1GiB, 1073741824 into MiB (integer).
# Prints nothing and returns 1 when the size is not a whole number of MiB.
size_to_mib() {
    local s=${1^^} n unit
    s=${s%IB}
    s=${s%B}
    if [[ $s =~ ^([0-9]+)([KMGT]?)$ ]]; then
        n=${BASH_REMATCH[1]}
        unit=${BASH_REMATCH[2]}
    else
        return 1
    fi
    case $unit in
        "") ((n % 1048576 == 0)) || return 1; echo $((n / 1048576)) ;;
        K) ((n % 1024 == 0)) || return 1; echo $((n / 1024)) ;;
        M) echo "$n" ;;
        G) echo $((n * 1024)) ;;
        T) echo $((n * 1024 * 1024)) ;;
    esac
}

# Run a command as root: directly when we are root, else through sudo -n.
as_root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        setup_error "need root (or password-less sudo) to run: $*"
    fi
}

_rig_apt_updated=0
# apt-get update, at most once per rig invocation.
apt_update_once() {
    ((_rig_apt_updated)) && return 0
    say "apt-get update"
    as_root timeout 300 apt-get update -qq >/dev/null ||
        setup_error "apt-get update failed"
    _rig_apt_updated=1
}

# True when the Debian package is installed.
pkg_installed() {
    [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null) == ii* ]]
}

# Install the given Debian packages that are not installed yet.
ensure_pkgs() {
    local p missing=()
    for p in "$@"; do
        pkg_installed "$p" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    apt_update_once
    say "apt-get install ${missing[*]}"
    local out
    if ! out=$(as_root env DEBIAN_FRONTEND=noninteractive timeout 600 \
        apt-get install -y -q --no-install-recommends "${missing[@]}" 2>&1); then
        printf '%s\n' "$out" | tail -n 20 >&2
        setup_error "apt-get install ${missing[*]} failed"
    fi
}

# apt-get download PKG... into DIR (an apt-get update first, once).
apt_download() {
    local dir=$1
    shift
    apt_update_once
    mkdir -p "$dir"
    # _apt cannot write into root's home: download as root, unsandboxed (that
    # is what the warning filtered below says).
    (cd "$dir" && timeout 600 apt-get download -q "$@" 2>&1 |
        grep -v -e 'Download is performed unsandboxed' -e '^Get:' -e '^Fetched' >&2 || true)
    local p
    for p in "$@"; do
        compgen -G "$dir/${p}_*.deb" >/dev/null || setup_error "apt-get download $p failed"
    done
}

# The newest downloaded .deb of package P in DIR.
deb_of() { ls -1 "$1/${2}"_*.deb 2>/dev/null | sort -V | tail -n 1; }
