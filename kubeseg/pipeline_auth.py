"""Where ``kubeseg submit`` finds the bearer token for a Kubeflow Pipelines API server, and the
endpoint that tells whether the server answers and which release it runs.

Names only, and no imports: the CLI's help text shows them (also in the predictor image, which
has no pipeline code) and ``kubeseg_platform.pipelines.submit`` and ``kubeseg preflight`` read
them.
"""

TOKEN_ENV = "KF_PIPELINES_TOKEN"
# In a pod, KFP's projected service-account token (audience pipelines.kubeflow.org): the file
# this variable names, else DEFAULT_SA_TOKEN_PATH.
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
DEFAULT_SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
# GET answers {"commit_sha": ..., "tag_name": release, "multi_user": bool} (kubeflow/pipelines
# 2.14.0 backend/src/apiserver/main.go).
HEALTHZ_PATH = "/apis/v2beta1/healthz"
