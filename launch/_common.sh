# Sourced by the launch/*.sh scripts: help from the calling script's header comment, one-line errors with
# exit status 2, and the option checks every launcher makes. Sets root (the repository) and python_default.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -x "$root/.venv/bin/python" ]]; then python_default="$root/.venv/bin/python"; else python_default=python3; fi

header_help() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "error: $0: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }
require_config() {
    [[ -n "$1" ]] || die "--config is required"
    [[ -f "$1" ]] || die "--config $1: no such file"
}
require_port() {   # OPTION VALUE
    [[ "$2" =~ ^[0-9]+$ && "$2" -ge 1 && "$2" -le 65535 ]] || die "$1 $2: need a port number (1-65535)"
}
require_positive() {   # OPTION VALUE
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 ${2:-<missing>}: need a positive integer"
}
optional_positive() {   # OPTION VALUE: unset is fine
    [[ -z "$2" ]] || require_positive "$1" "$2"
}
