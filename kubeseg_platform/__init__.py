"""kubeseg's platform code: the Kubeflow pipelines (:mod:`kubeseg_platform.pipelines`) and their
components (:mod:`kubeseg_platform.components`).

Their sources are the repository's top-level ``pipelines/`` and ``components/`` folders, which
this package links to (``kubeseg_platform/pipelines`` and ``kubeseg_platform/components`` are
symbolic links). So an installed kubeseg (``pip install .``, the images) holds them inside this
package and installs no top-level ``pipelines`` or ``components`` package that could clash with
another project's.
"""
