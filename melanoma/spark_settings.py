"""Spark settings the preprocess and augment jobs are tuned for (light: no Spark import).

Two kinds, because they take effect at different moments:

- :data:`SPARK_DEFAULTS` are read when the job's SparkContext starts; the job applies them only
  where spark-submit (or spark-defaults.conf) did not set them, so the caller keeps the last word.
- :func:`submit_conf` must be on the spark-submit command line itself (``--conf``): the driver's
  JVM options are fixed before any job code runs. The DAG and ``make bench-preprocess`` both
  use it, so the benchmark measures the configuration the pipeline runs.
"""

from __future__ import annotations

#: The driver JVM of these jobs starts, schedules ~40 tasks and moves a few KB of results per
#: task; the images never pass through it. C2's optimising compiler and parallel GC threads
#: buy nothing in such a short-lived process and compete with the Python workers for the
#: cores while it starts. With the preloading worker daemon below, these settings took ~2 s
#: (6%) off each preprocess run on 2 cores in an interleaved A/B (BENCHMARKS.md).
#: Executors' JVMs (on a cluster) keep the JVM's defaults.
DRIVER_JAVA_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"

SPARK_DEFAULTS = {
    # Keep each executor's Python worker between tasks: OpenCV, numpy and boto3 are imported
    # once per worker, not once per chunk (Spark's default, stated because it matters here).
    "spark.python.worker.reuse": "true",
    # Workers are forked from a daemon that has already imported numpy, OpenCV and the
    # ingestion code (melanoma.spark_daemon), so no worker pays for those imports.
    "spark.python.daemon.module": "melanoma.spark_daemon",
    "spark.ui.showConsoleProgress": "false",
    # A batch job's driver UI lives only while the job runs and nobody watches it; starting
    # its web server costs ~0.5 s of every run. `--conf spark.ui.enabled=true` brings it back.
    "spark.ui.enabled": "false",
    # Tasks are whole chunks of images: never re-run a slow one speculatively (it would only
    # rewrite the same shard).
    "spark.speculation": "false",
}


def submit_conf(python: str, driver_java_options: str = DRIVER_JAVA_OPTIONS) -> dict[str, str]:
    """``--conf`` pairs for spark-submit: the executors' and driver's Python, the driver's JVM options."""
    conf = {
        "spark.pyspark.python": python,
        "spark.pyspark.driver.python": python,
        "spark.ui.showConsoleProgress": "false",
    }
    if driver_java_options:
        conf["spark.driver.extraJavaOptions"] = driver_java_options
    return conf
