# Pinned Debian package versions with a fallback, sourced by ci/setup and ci/guest-image.
#
# Debian drops a point release's exact versions from its archive when it publishes the
# next one. A pin that is no longer offered must not break a fresh machine: the newest
# offered version of the same package is taken instead (for a kernel whose package name
# carries its ABI number, the newest package of the same series, given as a pattern), and
# a warning says so. The versions actually used are what callers record.

# pin_choose NAME VERSION [SERIES_REGEX]: reads "package version" lines (what the archive
# offers) on stdin and prints the "package version" to use: the pin when offered, else the
# newest version of NAME, else the newest version of the newest package whose name matches
# SERIES_REGEX (a whole-name ERE). Prints a WARNING on stderr for a fallback; fails (status
# 1, an ERROR on stderr) when nothing fits.
pin_choose() {
    local name=$1 version=$2 series=${3:-}
    local offered pick
    offered=$(cat)
    if printf '%s\n' "$offered" | grep -qxF "$name $version"; then
        echo "$name $version"
        return 0
    fi
    pick=$(printf '%s\n' "$offered" | awk -v n="$name" '$1 == n { print $1, $2 }' |
        sort -k2,2V | tail -n 1)
    if [ -z "$pick" ] && [ -n "$series" ]; then
        pick=$(printf '%s\n' "$offered" | grep -E "^($series) " | sort -V -k1,1 -k2,2 | tail -n 1)
    fi
    if [ -z "$pick" ]; then
        echo "ERROR: pinned $name=$version not offered, and no other version of it${series:+ or of series $series} is" >&2
        return 1
    fi
    echo "WARNING: pinned $name=$version not offered, using ${pick/ /=}" >&2
    echo "$pick"
}

# pin_offered APT_OPTS... -- NAME [SERIES_REGEX]: prints "package version" for every
# version the archive (as apt sees it with APT_OPTS) offers of NAME and of the packages
# whose names match SERIES_REGEX.
pin_offered() {
    local opts=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
    shift
    local name=$1 series=${2:-} pkgs p
    pkgs=$name
    if [ -n "$series" ]; then
        pkgs+=" $(apt-cache "${opts[@]}" pkgnames 2>/dev/null | grep -E "^($series)$" | tr '\n' ' ')"
    fi
    for p in $pkgs; do
        apt-cache "${opts[@]}" madison "$p" 2>/dev/null | awk -F'|' '{ gsub(/ /, "", $1); gsub(/ /, "", $2); print $1, $2 }'
    done | sort -u
}
