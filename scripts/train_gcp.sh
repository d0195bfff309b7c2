#!/usr/bin/env bash
# Train on several machines in Google Cloud: DDP over N nodes, on GKE or on Vertex AI.
#
#   scripts/train_gcp.sh --target gke --project P --region R --bucket B [options]
#   scripts/train_gcp.sh --target vertex --project P --region R --bucket B [options]
#   scripts/train_gcp.sh ... --dry-run        # print every command, run none
#
#   --target T          gke (an Indexed Job, deploy/training) or vertex (a CustomJob,
#                       deploy/vertex/customjob.yaml)
#   --project P         GCP project id (or PROJECT_ID)
#   --region R          region of the bucket, the registry, the cluster or the job (or REGION)
#   --bucket B          Cloud Storage bucket for the data and the runs, created when missing (or BUCKET)
#   --nodes N           machines, one training process each (2); the global batch is N x data.batch_size
#   --machine-type M    Vertex AI machine type (n2-standard-8); on GKE the Job's requests decide
#   --raw-dir DIR       the four Fashion-MNIST .gz files to upload (/usr/share/datasets/fashion-mnist)
#   --run-id ID         where the run goes: gs://B/runs/ID/ (default: UTC time)
#   --cluster NAME      GKE cluster, created when missing (fashion-mnist)
#   --repo NAME         Artifact Registry repository, created when missing (fashion-mnist)
#   --image REF         use this pushed training image instead of building and pushing one
#   --tag TAG           tag of the image this builds (default: git describe --always --dirty)
#
# Steps: enable the APIs; create the bucket when missing and upload the raw data files to
# gs://B/fashion-mnist/raw/ (the job checks them against the md5s pinned in training/data.py);
# build the training image (Dockerfile.train) with scripts/build_image.sh --train and push it;
# let the job's identity read and write the bucket; then either apply deploy/training with this
# run's image, bucket, run id and node count (GKE), or submit deploy/vertex/customjob.yaml filled
# in the same way (Vertex AI). Rank 0 writes the run to gs://B/runs/ID/node0/ and the export to
# gs://B/runs/ID/export/. docs/training.md ("Distributed training") walks through it.
set -euo pipefail
cd "$(dirname "$0")/.."

target=""
project=${PROJECT_ID:-}
region=${REGION:-}
bucket=${BUCKET:-}
nodes=2
machine_type=n2-standard-8
raw_dir=/usr/share/datasets/fashion-mnist
run_id=$(date -u +%Y%m%d-%H%M%S)
cluster=fashion-mnist
repo=fashion-mnist
image=""
tag=$(git describe --always --dirty 2>/dev/null || date -u +%Y%m%d%H%M%S)
dry_run=0
namespace=fashion-mnist-training
job=fashion-mnist-train

# shellcheck source=deploy/steps.sh
source deploy/steps.sh
while (($#)); do
    case "$1" in
    --target) target=$2; shift 2 ;;
    --bucket) bucket=$2; shift 2 ;;
    --nodes) nodes=$2; shift 2 ;;
    --machine-type) machine_type=$2; shift 2 ;;
    --raw-dir) raw_dir=$2; shift 2 ;;
    --run-id) run_id=$2; shift 2 ;;
    *) shared_option "$@"; shift "$taken" ;;
    esac
done

[[ $target == gke || $target == vertex ]] || fail "--target must be gke or vertex, not '$target'"
require_project_and_region
[[ -n $bucket ]] || fail "no bucket: pass --bucket or set BUCKET, e.g. --bucket $project-fashion-mnist"
[[ $bucket =~ ^[a-z0-9][a-z0-9_.-]{1,61}[a-z0-9]$ ]] || fail "--bucket '$bucket' is not a bucket name (lower-case letters, digits, - _ .)"
if [[ ! $nodes =~ ^[0-9]+$ ]] || ((nodes < 2)); then
    fail "--nodes must be a whole number of at least 2, not '$nodes' (on one machine: python -m training.train trainer=ddp)"
fi
[[ $run_id =~ ^[a-z0-9][a-z0-9-]*$ ]] || fail "--run-id '$run_id' may hold only lower-case letters, digits and -"
for file in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
    [[ -f $raw_dir/$file ]] || fail "$raw_dir/$file not found: pass --raw-dir, or install it with scripts/setup.sh"
done

# The filled-in kustomization or job spec this run submits.
work=$(mktemp -d "${TMPDIR:-/tmp}/train-gcp.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- project, bucket, data ----------------------------------------------------------------------
if [[ $target == gke ]]; then
    api=container.googleapis.com
else
    api=aiplatform.googleapis.com
fi
run gcloud services enable "$api" artifactregistry.googleapis.com storage.googleapis.com --project "$project"
ensure gcloud storage buckets describe "gs://$bucket" --project "$project" -- \
    gcloud storage buckets create "gs://$bucket" --location "$region" --project "$project" \
    --uniform-bucket-level-access
run gcloud storage rsync "$raw_dir" "gs://$bucket/fashion-mnist/raw" --project "$project"

# --- image --------------------------------------------------------------------------------------
if [[ -z $image ]]; then
    ensure gcloud artifacts repositories describe "$repo" --location "$region" --project "$project" -- \
        gcloud artifacts repositories create "$repo" --repository-format docker --location "$region" \
        --project "$project" --description "Fashion-MNIST images"
    registry=$region-docker.pkg.dev
    image=$registry/$project/$repo/fashion-mnist-train:$tag
    run gcloud auth configure-docker "$registry" --quiet
    run scripts/build_image.sh --train --tag "$image"
    run docker push "$image"
fi

# --- GKE: an Indexed Job ------------------------------------------------------------------------
if [[ $target == gke ]]; then
    # Autopilot clusters come with Workload Identity and the Cloud Storage FUSE CSI driver.
    ensure gcloud container clusters describe "$cluster" --location "$region" --project "$project" -- \
        gcloud container clusters create-auto "$cluster" --location "$region" --project "$project" \
        --release-channel stable
    number_cmd=(gcloud projects describe "$project" --format 'value(projectNumber)')
    if ((dry_run)); then
        echo "+ $(quote "${number_cmd[@]}")"
        number="<project number>"
    else
        number=$("${number_cmd[@]}")
    fi
    # The Job's Kubernetes service account, as Workload Identity names it.
    principal="principal://iam.googleapis.com/projects/$number/locations/global/workloadIdentityPools"
    principal+="/$project.svc.id.goog/subject/ns/$namespace/sa/$job"
    run gcloud storage buckets add-iam-policy-binding "gs://$bucket" --member "$principal" \
        --role roles/storage.objectUser --project "$project"
    run gcloud container clusters get-credentials "$cluster" --location "$region" --project "$project"
    # A Job's pod template cannot change: the previous run's Job goes first.
    run kubectl -n "$namespace" delete job "$job" --ignore-not-found
    write "$work/kustomization.yaml" <<EOF
# Written by scripts/train_gcp.sh: deploy/training with this run's image, bucket, run id and nodes.
$(kustomization_over deploy/training)
images:
  - name: fashion-mnist-train
    newName: ${image%:*}
    newTag: "${image##*:}"
patches:
  - target:
      kind: Job
      name: $job
    patch: |-
      - op: replace
        path: /spec/completions
        value: $nodes
      - op: replace
        path: /spec/parallelism
        value: $nodes
      - op: replace
        path: /spec/template/spec/containers/0/env/0
        value: {name: NNODES, value: "$nodes"}
      - op: replace
        path: /spec/template/spec/containers/0/env/2
        value: {name: RUN_ID, value: "$run_id"}
      - op: replace
        path: /spec/template/spec/volumes/0/csi/volumeAttributes/bucketName
        value: $bucket
EOF
    run kubectl apply -k "$work"
    cat <<EOF

Submitted Job $namespace/$job: $nodes pods, image $image
Follow it:  kubectl -n $namespace logs -f --prefix -l app.kubernetes.io/name=$job
Wait:       kubectl -n $namespace wait --for=condition=complete job/$job --timeout=4h
Outputs:    gs://$bucket/runs/$run_id/node0/ (run) and gs://$bucket/runs/$run_id/export/ (model)
EOF
    exit 0
fi

# --- Vertex AI: a CustomJob ---------------------------------------------------------------------
account=$job@$project.iam.gserviceaccount.com
ensure gcloud iam service-accounts describe "$account" --project "$project" -- \
    gcloud iam service-accounts create "$job" --project "$project" --display-name "Fashion-MNIST training"
run gcloud storage buckets add-iam-policy-binding "gs://$bucket" --member "serviceAccount:$account" \
    --role roles/storage.objectUser --project "$project"
spec=$(sed -e "s|\${IMAGE}|$image|g" -e "s|\${BUCKET}|$bucket|g" -e "s|\${RUN_ID}|$run_id|g" \
    -e "s|\${WORKERS}|$((nodes - 1))|g" -e "s|\${MACHINE_TYPE}|$machine_type|g" \
    -e "s|\${SERVICE_ACCOUNT}|$account|g" deploy/vertex/customjob.yaml)
write "$work/customjob.yaml" <<<"$spec"
run gcloud ai custom-jobs create --region "$region" --project "$project" \
    --display-name "$job-$run_id" --config "$work/customjob.yaml"
cat <<EOF

Submitted CustomJob $job-$run_id: $nodes x $machine_type, image $image
Follow it:  gcloud ai custom-jobs list --region $region --project $project --filter displayName=$job-$run_id
            then: gcloud ai custom-jobs stream-logs JOB_ID --region $region --project $project
Outputs:    gs://$bucket/runs/$run_id/node0/ (run) and gs://$bucket/runs/$run_id/export/ (model)
EOF
