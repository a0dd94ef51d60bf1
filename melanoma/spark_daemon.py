"""PySpark's worker daemon, with the ingestion code imported before it forks any worker.

Named by ``spark.python.daemon.module`` (see :mod:`melanoma.spark_settings`). PySpark starts
one daemon per executor and forks a Python worker from it per task slot; importing numpy,
OpenCV and :mod:`melanoma.ingest` here, once, means every forked worker already has them
(a few hundred ms each otherwise, paid while the tasks wait).
"""

import melanoma.augment  # noqa: F401  (imports: preloaded for the forked workers)
import melanoma.ingest  # noqa: F401
from pyspark.daemon import manager

if __name__ == "__main__":
    manager()
