# shellcheck shell=bash
# shellcheck disable=SC2154,SC2034  # the variables are the sourcing script's (dry_run, project, ...)
# Print-then-run steps for the GCP scripts (scripts/deploy_gke.sh, scripts/train_gcp.sh), which
# source this file. Every command is echoed as "+ cmd", so a --dry-run (dry_run=1 in the caller)
# prints the exact commands a real run would execute, and a real run logs what it did.

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }  # the script's header
fail() {  # a usage or input error: one line naming the fix, exit 2
    echo "$(basename "$0"): $*" >&2
    exit 2
}
require_project_and_region() {
    [[ -n $project ]] || fail "no project: pass --project or set PROJECT_ID (your projects: gcloud projects list)"
    [[ -n $region ]] || fail "no region: pass --region or set REGION, e.g. us-central1 (gcloud compute regions list)"
}
shared_option() {  # the options both scripts take; `taken` says how many words it used
    taken=2
    case "$1" in
    --project) project=${2:-} ;;
    --region) region=${2:-} ;;
    --cluster) cluster=${2:-} ;;
    --repo) repo=${2:-} ;;
    --image) image=${2:-} ;;
    --tag) tag=${2:-} ;;
    --dry-run) dry_run=1; taken=1 ;;
    -h | --help) usage; exit 0 ;;
    *) fail "unknown argument '$1' (see --help)" ;;
    esac
    (($# >= taken)) || fail "$1 needs a value (see --help)"
}
kustomization_over() {  # the head of a kustomization in $work built on DIR (kustomize wants a relative base)
    local base
    base=$(python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$1" "$work")
    printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - %s\n' "$base"
}
quote() {
    local words=() word
    for word in "$@"; do words+=("$(printf '%q' "$word")"); done
    echo "${words[*]}"
}
run() {  # print a command, then run it unless this is a dry run
    echo "+ $(quote "$@")"
    ((dry_run)) || "$@"
}
ensure() {  # ensure DESCRIBE... -- CREATE...: run CREATE unless DESCRIBE succeeds
    local describe=()
    while [[ $1 != -- ]]; do describe+=("$1"); shift; done
    shift
    if ((dry_run)); then
        echo "+ $(quote "${describe[@]}") >/dev/null 2>&1 || $(quote "$@")"
    elif "${describe[@]}" >/dev/null 2>&1; then
        echo "  exists: $(quote "${describe[@]}")"
    else
        run "$@"
    fi
}
write() {  # write FILE with the text on stdin, printed as a heredoc
    local text
    text=$(cat)
    echo "+ cat >$1 <<'EOF'"
    echo "$text"
    echo "EOF"
    echo "$text" >"$1"
}
