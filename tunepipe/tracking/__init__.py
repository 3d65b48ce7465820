"""What a run records beside its model: what the pipeline attaches (run_tracking.py), MLflow (mlflow_run.py,
mlflow_params.py), resources per step (monitor.py), TensorBoard / W&B (reporting.py), the training curves
(plots.py) and progress bars for generation (progress.py)."""
