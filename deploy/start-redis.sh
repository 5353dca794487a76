#!/usr/bin/env bash
# Start the run's Redis on a cluster's head with deploy/redis.conf, and fail loudly if it does not answer.
#
#   bash deploy/start-redis.sh
#
# * binds 127.0.0.1 and this node's private address (Ray's node IP), never a public one;
# * the ACL user `pag` gets a random password (kept across restarts), given to redis-server as its
#   SHA-256 only; the URL with the password goes to $PAG_REDIS_ENV_FILE (mode 0600), as
#   PAG_REDIS_URL=redis://pag:…@<ip>:<port>/0 — source it before `ray start --head` so that drivers on
#   the head get it (deploy/cluster.yaml does), and `pag train` reads it from there;
# * waits for PING as that user; on failure prints redis-server's log and exits 1 (with
#   `--daemonize yes` alone a server that cannot bind exits unnoticed);
# * already running (its pidfile, and it answers): leaves it and exits 0.
#
# Settings (environment):
#   PAG_REDIS_PORT      6379
#   PAG_REDIS_HOST      this node's private IP (Ray's, else the first of `hostname -I`): the URL's host
#   PAG_REDIS_BIND      "127.0.0.1 $PAG_REDIS_HOST"
#   PAG_REDIS_DIR       $HOME/pag-redis                 the AOF, the log and the pidfile
#   PAG_REDIS_ENV_FILE  $HOME/.pag/redis.env
#   PAG_REDIS_PASSWORD  the password to use (else the env file's, else a new random one)
#   PAG_REDIS_CONF      redis.conf beside this script
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
conf="${PAG_REDIS_CONF:-$here/redis.conf}"
port="${PAG_REDIS_PORT:-6379}"
dir="${PAG_REDIS_DIR:-$HOME/pag-redis}"
env_file="${PAG_REDIS_ENV_FILE:-$HOME/.pag/redis.env}"

node_ip() {
    python3 -c 'import ray.util; print(ray.util.get_node_ip_address())' 2>/dev/null \
        || hostname -I 2>/dev/null | awk '{print $1}'
}
host="${PAG_REDIS_HOST:-$(node_ip)}"
if [[ -z "$host" ]]; then
    echo "start-redis: cannot tell this node's private IP; set PAG_REDIS_HOST" >&2
    exit 1
fi
bind="${PAG_REDIS_BIND:-127.0.0.1 $host}"

password="${PAG_REDIS_PASSWORD:-}"
if [[ -z "$password" && -f "$env_file" ]]; then
    password="$(sed -n 's|^PAG_REDIS_URL=redis://pag:\([^@]*\)@.*|\1|p' "$env_file")"
fi
if [[ -z "$password" ]]; then
    password="$(head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
fi
if [[ ! "$password" =~ ^[A-Za-z0-9._~-]+$ ]]; then
    echo "start-redis: PAG_REDIS_PASSWORD may hold only A-Z a-z 0-9 . _ ~ - (it goes into a URL as is)" >&2
    exit 1
fi
hash="$(printf '%s' "$password" | sha256sum | cut -d' ' -f1)"
url="redis://pag:${password}@${host}:${port}/0"
shown="redis://pag:***@${host}:${port}/0"

mkdir -p "$dir" "$(dirname "$env_file")"
(umask 077 && printf 'PAG_REDIS_URL=%s\n' "$url" > "$env_file.tmp" && mv "$env_file.tmp" "$env_file")

ping() {
    REDISCLI_AUTH="$password" redis-cli -h 127.0.0.1 -p "$port" --user pag --no-auth-warning ping 2>/dev/null
}

pidfile="$dir/redis.pid"
if [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null && [[ "$(ping)" == PONG ]]; then
    echo "start-redis: already running on $shown (URL in $env_file)"
    exit 0
fi

log="$dir/redis.log"
seen="$(stat -c %s "$log" 2>/dev/null || echo 0)"   # this start's lines are the ones after these bytes
# shellcheck disable=SC2086  # $bind is a list of addresses
redis-server "$conf" --port "$port" --bind $bind --dir "$dir" \
    --user pag on "#$hash" '~pag:*' '&*' '+@all' '-@dangerous' '+info' \
    --daemonize yes --pidfile "$pidfile" --logfile "$log"

for _ in $(seq 1 100); do
    if [[ "$(ping)" == PONG ]]; then
        echo "start-redis: redis-server answers on $shown (AOF in $dir; URL in $env_file)"
        exit 0
    fi
    if tail -c "+$((seen + 1))" "$log" 2>/dev/null | grep -q 'aborting'; then
        break   # it gave up (e.g. an address this node does not have): no need to wait
    fi
    sleep 0.1
done
echo "start-redis: redis-server is not answering on 127.0.0.1:$port; its log:" >&2
tail -c "+$((seen + 1))" "$log" 2>/dev/null | tail -n 20 >&2 || true
exit 1
