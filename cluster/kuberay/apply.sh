#!/usr/bin/env bash
# Apply raylm's Kubernetes objects in order and wait for each to be ready, then (with --run) submit the
# pipeline RayJob and follow it. Needs kubectl pointing at the cluster, the KubeRay operator (>= 1.5.1)
# installed, the image built and pushed (set it in kustomization.yaml). It creates the Secrets raylm-ray-token
# (Ray's auth token) and raylm-mlflow-auth (MLflow's admin password and CSRF key) with random values if absent.
#   cluster/kuberay/apply.sh          # namespace, storage, MLflow, Ray cluster
#   cluster/kuberay/apply.sh --run    # ... and the pipeline RayJob
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
ns=raylm

kubectl get crd rayclusters.ray.io rayjobs.ray.io >/dev/null || {
  echo "KubeRay CRDs are missing: install the KubeRay operator first (cluster/README.md, step 2)" >&2; exit 1; }

kubectl apply -f "$here/namespace.yaml"
kubectl -n "$ns" get secret raylm-ray-token >/dev/null 2>&1 || {
  echo "creating the Ray auth token Secret raylm-ray-token"
  kubectl -n "$ns" create secret generic raylm-ray-token --from-literal=auth_token="$(openssl rand -hex 32)"; }
kubectl -n "$ns" get secret raylm-mlflow-auth >/dev/null 2>&1 || {
  echo "creating the MLflow credentials Secret raylm-mlflow-auth (user raylm)"
  kubectl -n "$ns" create secret generic raylm-mlflow-auth --from-literal=password="$(openssl rand -hex 24)" \
    --from-literal=flask-secret-key="$(openssl rand -hex 32)"; }

kubectl apply -k "$here"
kubectl -n "$ns" rollout status deployment/mlflow --timeout=10m
kubectl -n "$ns" wait raycluster/raylm --for=condition=HeadPodReady --timeout=15m

if [[ "${1:-}" == "--run" ]]; then
  kubectl -n "$ns" delete rayjob raylm-pipeline --ignore-not-found
  kubectl -n "$ns" apply -f "$here/rayjob.yaml"
  kubectl -n "$ns" wait rayjob/raylm-pipeline --for=jsonpath='{.status.jobDeploymentStatus}'=Running --timeout=15m
  kubectl -n "$ns" logs -f job/raylm-pipeline
  kubectl -n "$ns" get rayjob raylm-pipeline -o jsonpath='{.status.jobStatus}{"\n"}'
fi
