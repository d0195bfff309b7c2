# shellcheck shell=sh
# shellcheck disable=SC2034  # stopped and status are for the script that sources this file
# Sourced by docker/serve.sh and docker/proxy.sh: run the container's server in the background and
# stop it gracefully on SIGTERM/SIGINT.
#
#     supervise STOP_COMMAND SERVER_COMMAND...
#
# runs SERVER_COMMAND, and on a signal evals STOP_COMMAND (it may use "$child", the server's PID)
# and waits until the server has exited. Afterwards `stopped` is 1 if a signal stopped it (empty if
# the server ended by itself) and `status` holds the server's exit status.

supervise() {
    stop=$1
    shift
    "$@" &
    child=$!
    stopped=""
    trap 'stopped=1; eval "$stop"' TERM INT
    status=0
    wait "$child" || status=$?
    if [ -n "$stopped" ]; then
        # The first wait returned when the signal arrived; the server exits once the stop is done.
        status=0
        wait "$child" || status=$?
    fi
}
