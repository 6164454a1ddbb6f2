#!/usr/bin/env bash
# jaxchat on Vertex AI: upload the image (built by cloudbuild.yaml) as a model with a
# custom container, create an endpoint, and deploy the model to it.
#   PROJECT=my-project REGION=us-central1 IMAGE=REGION-docker.pkg.dev/.../jaxchat:TAG \
#     bash infra/vertex/deploy.sh
# Then: gcloud ai endpoints predict ENDPOINT_ID --region=$REGION --json-request=request.json
# with request.json = {"instances": [{"messages": [{"role": "user", "content": "Hi"}]}],
#                      "parameters": {"max_tokens": 64}}
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${IMAGE:?set IMAGE}"
NAME="${NAME:-jaxchat}"
MACHINE="${MACHINE:-n2-standard-4}"

# The container listens on AIP_HTTP_PORT (8080) and answers the routes Vertex names
# (AIP_HEALTH_ROUTE, AIP_PREDICT_ROUTE): handler/vertex.py.
gcloud ai models upload --project="$PROJECT" --region="$REGION" \
  --display-name="$NAME" \
  --container-image-uri="$IMAGE" \
  --container-ports=8080 \
  --container-health-route=/health \
  --container-predict-route=/predict \
  --container-env-vars="JAXCHAT_LOG_FORMAT=json"

MODEL_ID="$(gcloud ai models list --project="$PROJECT" --region="$REGION" \
  --filter="display_name=$NAME" --sort-by=~createTime --limit=1 --format='value(name)')"

ENDPOINT_ID="$(gcloud ai endpoints list --project="$PROJECT" --region="$REGION" \
  --filter="display_name=$NAME" --format='value(name)' | head -n 1)"
if [[ -z "$ENDPOINT_ID" ]]; then
  gcloud ai endpoints create --project="$PROJECT" --region="$REGION" --display-name="$NAME"
  ENDPOINT_ID="$(gcloud ai endpoints list --project="$PROJECT" --region="$REGION" \
    --filter="display_name=$NAME" --format='value(name)' | head -n 1)"
fi

gcloud ai endpoints deploy-model "$ENDPOINT_ID" --project="$PROJECT" --region="$REGION" \
  --model="$MODEL_ID" --display-name="$NAME" --machine-type="$MACHINE" \
  --min-replica-count=1 --max-replica-count="${MAX_REPLICAS:-2}" --traffic-split=0=100
echo "deployed $MODEL_ID to endpoint $ENDPOINT_ID"
