"""What a run records beside its model: MLflow (mlflow_run.py), resources per step (monitor.py), TensorBoard / W&B
(reporting.py), the training curves (plots.py) and progress bars for generation (progress.py)."""
