"""Experiment tracking: the only package of the library that talks to MLflow, one module a job.

- store.py: where the runs live (the tracking URI, the project's sqlite store and its artifact
  folder, a fast failure on an unreachable server) and the two experiments with their UI views.
- runs.py: one MLflow run per trained model (`Tracker`, or `NullTracker` when tracking is off),
  the metric names the UI shows, and the small run record pretrain leaves for the later stages.
- ui.py: the `mlflow server` command line behind `nanollm ui`, and the page it opens.
- models.py: the trained model as an MLflow model: logged with nanollm's own code, registered
  under an alias, fetched back for a server.

Import the module that does the job (`from nanollm.tracking.runs import make_tracker`): a stage
then depends on that module alone, so an edit to the UI's command line re-runs no training.
mlflow itself is imported lazily, inside the functions that need it.
"""
