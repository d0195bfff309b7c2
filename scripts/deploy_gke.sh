#!/usr/bin/env bash
# Deploy the serving image to GKE: from an empty project to a first prediction.
#
#   scripts/deploy_gke.sh --project P --region R --allow-cidr CIDR [options]
#   scripts/deploy_gke.sh ... --dry-run        # print every command, run none
#
#   --project P        GCP project id (or PROJECT_ID)
#   --region R         region of the cluster and the Artifact Registry repository (or REGION)
#   --allow-cidr CIDR  client range allowed through the load balancer, repeatable (or ALLOW_CIDRS,
#                      comma-separated); 0.0.0.0/0 opens it to everyone
#   --cluster NAME     cluster, created when missing (fashion-mnist)
#   --mode M           autopilot (default) or standard, for a cluster this creates
#   --repo NAME        Artifact Registry repository, created when missing (fashion-mnist)
#   --image REF        deploy this pushed image instead of building and pushing one (Cloud Build)
#   --tag TAG          tag of the image this builds (default: git describe --always --dirty)
#
# Steps: enable the APIs; create the repository and the cluster (release channel stable) when
# missing; build the image with scripts/build_image.sh and push it; get cluster credentials;
# create the namespace, and the token Secret when missing (a random 64-hex-character token); apply
# deploy/overlays/gke with the image and the client ranges (a kustomization in a temporary
# directory, printed in full); wait for the rollout and the load balancer's address; print the
# endpoint and a curl that predicts.
# docs/deploy.md walks through it and lists what the default sizes cost.
set -euo pipefail
cd "$(dirname "$0")/.."

project=${PROJECT_ID:-}
region=${REGION:-}
cluster=fashion-mnist
mode=autopilot
repo=fashion-mnist
image=""
# The commit, marked -dirty when the working tree has changes (then the tag names no commit).
tag=$(git describe --always --dirty 2>/dev/null || date -u +%Y%m%d%H%M%S)
IFS=, read -r -a cidrs <<<"${ALLOW_CIDRS:-}"
dry_run=0
namespace=fashion-mnist

# shellcheck source=deploy/steps.sh
source deploy/steps.sh
while (($#)); do
    case "$1" in
    --allow-cidr) cidrs+=("$2"); shift 2 ;;
    --mode) mode=$2; shift 2 ;;
    *) shared_option "$@"; shift "$taken" ;;
    esac
done

require_project_and_region
[[ $mode == autopilot || $mode == standard ]] || fail "--mode must be autopilot or standard, not '$mode'"
((${#cidrs[@]})) || fail "no client range: pass --allow-cidr, e.g. your address: --allow-cidr \$(curl -s https://checkip.amazonaws.com)/32"
for cidr in "${cidrs[@]}"; do
    [[ $cidr =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}$ ]] || fail "--allow-cidr '$cidr' is not an IPv4 CIDR like 203.0.113.7/32"
done

# The kustomization this deploy applies, and the new token on its way into the Secret.
work=$(mktemp -d "${TMPDIR:-/tmp}/deploy-gke.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- project, registry, cluster -----------------------------------------------------------------
run gcloud services enable container.googleapis.com artifactregistry.googleapis.com --project "$project"
ensure gcloud artifacts repositories describe "$repo" --location "$region" --project "$project" -- \
    gcloud artifacts repositories create "$repo" --repository-format docker --location "$region" \
    --project "$project" --description "Fashion-MNIST serving images"
if [[ $mode == autopilot ]]; then
    create_cluster=(gcloud container clusters create-auto "$cluster" --location "$region" --project "$project"
        --release-channel stable)
else
    # One e2-standard-4 node per zone (three zones), two per zone at most: a replica requests 1.75
    # CPU (docs/deploy.md, "CPU: what one pod holds"), more than an e2-standard-2 leaves after the
    # system pods, so each node takes one replica beside them, and a second during a rollout.
    create_cluster=(gcloud container clusters create "$cluster" --location "$region" --project "$project"
        --release-channel stable --machine-type e2-standard-4 --num-nodes 1 --enable-autoscaling
        --min-nodes 1 --max-nodes 2 --enable-dataplane-v2 --enable-managed-prometheus)
fi
ensure gcloud container clusters describe "$cluster" --location "$region" --project "$project" -- "${create_cluster[@]}"

# --- image --------------------------------------------------------------------------------------
if [[ -z $image ]]; then
    registry=$region-docker.pkg.dev
    image=$registry/$project/$repo/fashion-mnist-serve:$tag
    run gcloud auth configure-docker "$registry" --quiet
    run scripts/build_image.sh --tag "$image"
    run docker push "$image"
fi
# kustomize wants the image as name plus tag or digest.
if [[ $image == *@* ]]; then
    image_fields="newName: ${image%@*}"$'\n'"    digest: ${image#*@}"
elif [[ ${image##*/} == *:* ]]; then
    image_fields="newName: ${image%:*}"$'\n'"    newTag: \"${image##*:}\""
else
    image_fields="newName: $image"$'\n'"    newTag: latest"
fi

# --- deploy -------------------------------------------------------------------------------------
run gcloud container clusters get-credentials "$cluster" --location "$region" --project "$project"
run kubectl apply -f deploy/overlays/gke/namespace.yaml

secret=(kubectl -n "$namespace" get secret fashion-mnist-token)
if ((dry_run)); then
    echo "+ $(quote "${secret[@]}") >/dev/null 2>&1 || kubectl -n $namespace create secret generic" \
        "fashion-mnist-token --from-file=tokens=<a file holding a new random token>"
elif "${secret[@]}" >/dev/null 2>&1; then
    echo "  exists: $(quote "${secret[@]}")"
else
    # Through a private file, so the token shows up in no command line and no log.
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' >"$work/tokens")
    run kubectl -n "$namespace" create secret generic fashion-mnist-token --from-file=tokens="$work/tokens"
    rm -f "$work/tokens"
fi

ranges=$(printf '"%s", ' "${cidrs[@]}")
kustomization="# Written by scripts/deploy_gke.sh: the gke overlay with this deploy's image and client ranges.
$(kustomization_over deploy/overlays/gke)
images:
  - name: fashion-mnist-serve
    $image_fields
patches:
  - target:
      kind: Service
      name: fashion-mnist
    patch: |-
      - op: add
        path: /spec/loadBalancerSourceRanges
        value: [${ranges%, }]"
echo "+ cat >$work/kustomization.yaml <<'EOF'"
echo "$kustomization"
echo "EOF"
echo "$kustomization" >"$work/kustomization.yaml"
run kubectl apply -k "$work"
run kubectl -n "$namespace" rollout status deployment/fashion-mnist --timeout=10m

# --- endpoint -----------------------------------------------------------------------------------
address_cmd=(kubectl -n "$namespace" get service fashion-mnist -o 'jsonpath={.status.loadBalancer.ingress[0].ip}')
address="<load balancer address>"
if ((dry_run)); then
    echo "+ $(quote "${address_cmd[@]}")   # repeated until it prints an address"
else
    echo "+ $(quote "${address_cmd[@]}")   # repeated until it prints an address (up to 5 minutes)"
    deadline=$((SECONDS + 300))
    address=""
    until [[ -n $address ]]; do
        ((SECONDS < deadline)) || { echo "deploy_gke.sh: no load balancer address after 5 minutes; check: kubectl -n $namespace describe service fashion-mnist" >&2; exit 1; }
        address=$("${address_cmd[@]}")
        [[ -n $address ]] || sleep 5
    done
fi

cat <<EOF

Deployed $image
Endpoint: http://$address/predictions/fashion_mnist
Predict a test image (\`make all\` or \`.venv/bin/python -m training.data --samples data/samples\` writes it):
  TOKEN=\$(kubectl -n $namespace get secret fashion-mnist-token -o jsonpath='{.data.tokens}' | base64 -d | head -n 1)
  curl -H "Authorization: Bearer \$TOKEN" -T data/samples/test00000_Ankle-boot.png http://$address/predictions/fashion_mnist
Management API (admins only, never exposed): kubectl -n $namespace port-forward deployment/fashion-mnist 8081:8081
EOF
