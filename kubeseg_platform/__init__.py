"""kubeseg's platform code: the Kubeflow pipelines (:mod:`kubeseg_platform.pipelines`) and their
components (:mod:`kubeseg_platform.components`).

Their sources are the repository's top-level ``pipelines/`` and ``components/`` folders. An
installed kubeseg (``pip install .``, the images) has them inside this package (setup.cfg's
``package_dir``), so it installs no top-level ``pipelines`` or ``components`` package that could
clash with another project's. In a source checkout they sit beside this folder, and this
package's path includes the checkout's top level to find them.
"""
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
if not os.path.isdir(os.path.join(_HERE, "pipelines")):  # a source checkout
    __path__.append(os.path.dirname(_HERE))
