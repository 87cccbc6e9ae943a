#!/usr/bin/env bash
# Installs the peers that `python -m loadtests.bench` measures the gateway against, idempotently:
#   nginx        Debian package (needs root for apt-get; skipped when `nginx` is already on PATH)
#   LiteLLM      pinned, into its own virtualenv .bench/venv-litellm
#   vllm-router  pinned, into its own virtualenv .bench/venv-vllm-router
# Each peer is installed on its own: one that fails is reported and the others still install. The benchmark
# reports a missing peer as a "not available: why" row. Nothing downloaded here is committed (.bench/ is ignored).
#
#   loadtests/install-peers.sh [nginx] [litellm] [vllm-router]     (default: all three)
#
# LiteLLM: releases 1.82.7 and 1.82.8 (March 2026) and 1.107.0 were compromised on PyPI (credential stealers
# shipped as a .pth file that runs at every interpreter start). The pin is from the 1.108 line the issue's figures
# came from: 1.108.7 is the newest 1.108 release whose `[proxy]` extra resolves here (1.108.8-1.108.14 pin
# litellm-enterprise / litellm-proxy-extras post-releases that the index does not serve). The script refuses a
# known-bad pin and checks the installed environment for .pth files that run code.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="${BENCH_DIR:-$REPO/.bench}"
PYTHON="${PYTHON:-python3}"
LITELLM_VERSION="${LITELLM_VERSION:-1.108.7}"
VLLM_ROUTER_VERSION="${VLLM_ROUTER_VERSION:-0.1.17}"
COMPROMISED_LITELLM="1.82.7 1.82.8 1.107.0"

log() { printf 'install-peers: %s\n' "$*" >&2; }

install_nginx() {
    if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
        log "nginx: present ($(/usr/sbin/nginx -v 2>&1 || nginx -v 2>&1))"
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        log "nginx: missing and not root: run 'apt-get install -y nginx-light' or 'nginx' as root"
        return 1
    fi
    log "nginx: apt-get install nginx"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends nginx >/dev/null || {
        log "nginx: apt-get failed"
        return 1
    }
    # The package starts a system nginx on :80 where an init system runs; the benchmark starts its own.
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now nginx >/dev/null 2>&1 || true; fi
    log "nginx: $(/usr/sbin/nginx -v 2>&1)"
}

# venv_install DIR SPEC CHECK: a virtualenv at DIR with SPEC installed, unless CHECK already passes there.
venv_install() {
    local dir="$1" spec="$2" check="$3"
    if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "$check" >/dev/null 2>&1; then
        log "$spec: present in $dir"
        return 0
    fi
    mkdir -p "$(dirname "$dir")"
    [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir" || { log "$spec: venv failed"; return 1; }
    log "$spec: pip install into $dir (a minute or two)"
    "$dir/bin/pip" install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
    # (grep drops pip's notes about unused local index locations; PIPESTATUS keeps pip's own status)
    "$dir/bin/pip" install -q --disable-pip-version-check "$spec" 2>&1 | grep -v '^WARNING: Location' >&2
    [ "${PIPESTATUS[0]}" = 0 ] || { log "$spec: pip install failed"; return 1; }
    "$dir/bin/python" -c "$check" || { log "$spec: installed but the check failed"; return 1; }
}

# Lists .pth files in a venv that execute code (an "import" line): the vector of the LiteLLM compromise.
check_pth() {
    local dir="$1" bad=0 f
    while IFS= read -r f; do
        case "$(basename "$f")" in
            distutils-precedence.pth | _virtualenv.pth) continue ;; # setuptools' and virtualenv's own
        esac
        if grep -qE '^\s*import' "$f"; then
            log "WARNING: $f runs code at interpreter start:"
            head -c 300 "$f" >&2
            echo >&2
            bad=1
        fi
    done < <(find "$dir/lib" -maxdepth 3 -name '*.pth' 2>/dev/null)
    return $bad
}

install_litellm() {
    local v
    for v in $COMPROMISED_LITELLM; do
        if [ "$LITELLM_VERSION" = "$v" ]; then
            log "litellm: refusing $v (a compromised release)"
            return 1
        fi
    done
    venv_install "$BENCH/venv-litellm" "litellm[proxy]==$LITELLM_VERSION" \
        "import importlib.metadata as m, sys; sys.exit(m.version('litellm') != '$LITELLM_VERSION')" || return 1
    check_pth "$BENCH/venv-litellm" || { log "litellm: suspicious .pth file: removing the venv"; rm -rf "$BENCH/venv-litellm"; return 1; }
    log "litellm: $LITELLM_VERSION"
}

install_vllm_router() {
    venv_install "$BENCH/venv-vllm-router" "vllm-router==$VLLM_ROUTER_VERSION" \
        "import importlib.metadata as m, sys; sys.exit(m.version('vllm-router') != '$VLLM_ROUTER_VERSION')" || return 1
    log "vllm-router: $VLLM_ROUTER_VERSION"
}

status=0
peers=("$@")
[ ${#peers[@]} -gt 0 ] || peers=(nginx litellm vllm-router)
for peer in "${peers[@]}"; do
    case "$peer" in
        nginx) install_nginx || status=1 ;;
        litellm) install_litellm || status=1 ;;
        vllm-router) install_vllm_router || status=1 ;;
        *) log "unknown peer $peer (nginx, litellm, vllm-router)"; status=2 ;;
    esac
done
exit $status
