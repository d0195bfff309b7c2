#!/bin/sh
# The Kubernetes pod's front door: nginx in front of TorchServe, checking the shared bearer token.
#
#     args: ["/opt/fashion-serve/proxy.sh"]     # container "proxy" in deploy/base/deployment.yaml
#
# The Deployment mounts the Secret fashion-mnist-token at /var/run/secrets/fashion-mnist: its file
# `tokens` holds one token per line, and clients send `Authorization: Bearer <token>`. More than
# one line lets a token be rotated without downtime. The tokens become an nginx map in
# /tmp/nginx/tokens.map, which the nginx config (deploy/base/proxy/nginx.conf, mounted from a
# ConfigMap at /etc/fashion-mnist/proxy) includes. SIGTERM becomes nginx's graceful stop: no new
# connections, requests in flight finish, then exit 0. A bad Secret exits 2 before nginx starts.
set -eu

conf=/etc/fashion-mnist/proxy/nginx.conf
tokens=/var/run/secrets/fashion-mnist/tokens
state=/tmp/nginx
secret_hint="create it with scripts/deploy_gke.sh, or: kubectl -n fashion-mnist create secret generic fashion-mnist-token --from-literal=tokens=\$(openssl rand -hex 32)"

if [ ! -r "$tokens" ]; then
    echo "proxy.sh: token file $tokens not readable; $secret_hint" >&2
    exit 2
fi
mkdir -p "$state"
map=$state/tokens.map
: >"$map.new"
count=0
while IFS= read -r token || [ -n "$token" ]; do
    token=$(printf '%s' "$token" | tr -d ' \t\r')
    [ -n "$token" ] || continue
    # RFC 6750 token characters only: nothing that could end the nginx string it is written into.
    case "$token" in
    *[!A-Za-z0-9._~+/=-]*)
        echo "proxy.sh: a token in $tokens has characters outside A-Za-z0-9._~+/=-; $secret_hint" >&2
        exit 2
        ;;
    esac
    if [ "${#token}" -lt 32 ] || [ "${#token}" -gt 128 ]; then
        echo "proxy.sh: a token in $tokens is not 32 to 128 characters long; $secret_hint" >&2
        exit 2
    fi
    # A case-sensitive regex (nginx.conf says why); `.` and `+` are the token characters that
    # mean something in a regex, so they become one-character classes.
    printf '"~^Bearer %s$" 1;\n' "$(printf '%s' "$token" | sed 's/[.+]/[&]/g')" >>"$map.new"
    count=$((count + 1))
done <"$tokens"
if [ "$count" -eq 0 ]; then
    echo "proxy.sh: $tokens holds no token; $secret_hint" >&2
    exit 2
fi
mv "$map.new" "$map"

# nginx's graceful stop (QUIT): no new connections, requests in flight finish, then exit 0.
# shellcheck source=docker/supervise.sh
. "$(dirname "$0")/supervise.sh"
# shellcheck disable=SC2016  # $child expands when the stop runs, inside supervise
supervise 'kill -QUIT "$child"' nginx -e stderr -c "$conf"
exit "$status"
