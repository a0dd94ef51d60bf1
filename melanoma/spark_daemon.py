"""PySpark's worker daemon, with the executor code imported before it forks any worker.

Named by ``spark.python.daemon.module`` (see :mod:`melanoma.spark_settings`). PySpark starts
one daemon per executor and forks a Python worker from it per task slot; importing numpy,
OpenCV and the jobs' executor modules (:mod:`melanoma.preprocess_chunk`,
:mod:`melanoma.augment_job`) here, once, means every forked worker already has them (a few
hundred ms each otherwise, paid while the tasks wait).
"""

from pyspark.daemon import manager

import melanoma.augment_job  # noqa: F401  (imports: preloaded for the forked workers)
import melanoma.preprocess_chunk  # noqa: F401

if __name__ == "__main__":
    manager()
