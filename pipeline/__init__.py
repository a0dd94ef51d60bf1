"""The Airflow runtime: what the DAG files and their tasks call. Never shipped to Spark.

``dags/`` wires tasks; the code behind them lives here: the run plan and drop selection
(:mod:`pipeline.airflow_ops`), the DAG files' shared Params, assets and Spark tasks
(:mod:`pipeline.dag_parts`), the asset events (:mod:`pipeline.asset_ops`), the training DAG's plan and
retraining policy (:mod:`pipeline.retrain`), the training steps as tasks
(:mod:`pipeline.training_tasks`) and the embedded demo (:mod:`pipeline.demo`, ``make demo``).

Only the Airflow image gets this package (docker/airflow/Dockerfile). The Spark image ships
``melanoma`` alone, and ``melanoma`` never imports from here nor from ``airflow``
(tests/test_layout.py), so an executor never needs Airflow. Imported when the DAG is parsed:
nothing heavy at module level (no TensorFlow, no PySpark; ruff's TID253 in pyproject.toml).
"""
