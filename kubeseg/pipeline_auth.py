"""Where ``kubeseg submit`` finds the bearer token for a Kubeflow Pipelines API server.

Names only, and no imports: the CLI's help text shows them (also in the predictor image, which
has no ``pipelines`` package) and ``pipelines.submit`` reads them.
"""

TOKEN_ENV = "KF_PIPELINES_TOKEN"
# In a pod, KFP's projected service-account token (audience pipelines.kubeflow.org): the file
# this variable names, else DEFAULT_SA_TOKEN_PATH.
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
DEFAULT_SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
