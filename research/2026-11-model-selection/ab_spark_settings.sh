#!/bin/bash
# A/B of the Spark jobs' settings (melanoma/spark_settings.py) on the preprocess benchmark's
# corpus: interleaved pairs of spark-submit runs, "old" = PySpark's own worker daemon and the
# default driver JVM, "new" = the settings the DAG uses. Prints one wall-clock line per run.
# Run after `make bench-preprocess` has built benchmarks/corpus, holding the CPU lock:
#   flock -x /tmp/melanoma-cpu.lock research/2026-11-model-selection/ab_spark_settings.sh [pairs]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="$PWD/.venv/bin/python"
export PATH="$PWD/.venv/bin:$PATH" SPARK_LOCAL_IP=127.0.0.1
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
JAVA_OPTS="$("$PY" -c 'from melanoma.spark_settings import DRIVER_JAVA_OPTIONS; print(DRIVER_JAVA_OPTIONS)')"
for i in $(seq 1 "${1:-4}"); do
  for mode in old new; do
    rm -rf "$OUT/processed"
    cat benchmarks/corpus/ham10000-600x450/HAM10000_images_part_*/*.jpg benchmarks/corpus/ham10000-600x450/HAM10000_segmentations/*.png > /dev/null
    if [ "$mode" = old ]; then extra=(--conf spark.python.daemon.module=pyspark.daemon); else extra=(--conf "spark.driver.extraJavaOptions=$JAVA_OPTS"); fi
    start=$(date +%s.%N)
    spark-submit --master 'local[2]' --conf "spark.pyspark.python=$PY" --conf "spark.pyspark.driver.python=$PY" "${extra[@]}" \
      spark_jobs/preprocess.py --raw-root benchmarks/corpus --processed-root "$OUT/processed" --drops ham10000-600x450 > "$OUT/$mode-$i.log" 2>&1
    end=$(date +%s.%N)
    echo "$mode $i $(echo "$end - $start" | bc) s, load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
